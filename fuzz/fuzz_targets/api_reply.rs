#![no_main]
//! Replies of a chat-completions server, as `mmkd distill-data --teacher-url` reads them.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mmkd::datagen::client::parse_reply(text);
    }
});
