#![no_main]
//! The evaluation and scoring readers: VQA questions and references, caption references, POPE
//! labels, predictions. The first byte picks the reader.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let path = mmkd_fuzz::as_file("records.jsonl", rest);
    use mmkd::scoring::readers::*;
    let _ = match which % 5 {
        0 => read_vqa_questions(&path).map(|_| ()),
        1 => read_vqa_references(&path).map(|_| ()),
        2 => read_caption_references(&path).map(|_| ()),
        3 => read_pope_labels(&path).map(|_| ()),
        _ => read_predictions(&path).map(|_| ()),
    };
});
