#![no_main]
//! `mmkd distill-data` recipes: the recipe TOML and its seed JSONL (the input split at its first
//! NUL byte), then the prompts planned for an image and the filters on a reply made of the rest.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let recipe = parts.next().unwrap_or("");
    let seed = parts.next().unwrap_or("").to_string();
    let reply = parts.next().unwrap_or("");
    let parsed = mmkd::datagen::Recipe::parse(recipe, "fuzz.toml", |_| Ok(seed));
    if let Ok(r) = parsed {
        if r.generation.n_per_image > 64 {
            return;
        }
        let mut duplicates = mmkd::datagen::filters::DuplicateFilter::new(&r);
        for prompt in r.plan("images/000000.png") {
            let reply = mmkd::datagen::filters::Reply {
                text: reply.to_string(),
                finished: true,
                token_logprobs: Some(vec![-0.5; reply.len().min(8)]),
                alternatives: Vec::new(),
            };
            if let Ok(w) = mmkd::datagen::filters::accept(&r, &prompt, &reply) {
                let _ = duplicates.admit(&w);
            }
        }
    }
});
