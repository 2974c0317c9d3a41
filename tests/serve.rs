//! `mmkd serve` (issue 19, part 2): a model behind the OpenAI chat-completions API on loopback
//! answers a question about an image exactly as `mmkd generate` does and reports its tokens'
//! log-probabilities (greedy: each token is its place's most likely); the world's chat teacher
//! takes a multi-turn conversation and answers what the server does not do with a 400 naming
//! it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use base64::Engine;
use common::mmkd;
use common::served::serve;
use common::world::world;
use serde_json::{json, Value};

/// (status, JSON body) of one HTTP/1.1 request.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A base64 data URL of the PNG at `path`.
fn data_url(path: &std::path::Path) -> String {
    let png = base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
    format!("data:image/png;base64,{png}")
}

#[test]
fn a_served_model_answers_as_generate_does_with_log_probabilities() {
    // The fixture's first reference prompt (`plain`): six tokens with no end-of-text among them.
    let model = common::fixture("llava_siglip_qwen2");
    let served = serve(model.to_str().unwrap());
    let (status, models) = http(&served.addr, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "teacher");

    let image = common::fixture("images").join("img0_circle_32x32.png");
    let text = "describe the image in one short sentence<|im_end|>";
    let request = json!({
        "model": "teacher",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(&image)}},
            {"type": "text", "text": text}]}],
        "max_tokens": 6,
        "logprobs": true,
        "top_logprobs": 3,
    });
    let (status, answer) = http(
        &served.addr,
        "POST",
        "/v1/chat/completions",
        &request.to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let (ok, generated, err) = mmkd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        text,
        "--max-new-tokens",
        "6",
    ]);
    assert!(ok, "{err}");
    assert_eq!(content, generated.trim_end_matches('\n'));
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let usage = &answer["usage"];
    assert_eq!(usage["completion_tokens"], 6);
    assert!(
        usage["prompt_tokens"].as_u64().unwrap() > 16,
        "the image block is counted"
    );
    let tokens = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(tokens.len(), 6);
    for token in tokens {
        let top = token["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the generated token is its place's most likely one.
        assert_eq!(top[0]["token"], token["token"]);
        assert_eq!(top[0]["logprob"], token["logprob"]);
        assert!(token["logprob"].as_f64().unwrap() <= 0.0);
        assert!(top[1]["logprob"].as_f64() <= top[0]["logprob"].as_f64());
    }
    // A model without a chat template answers single questions only.
    let two_turns = json!({"messages": [{"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]});
    let (status, answer) = http(
        &served.addr,
        "POST",
        "/v1/chat/completions",
        &two_turns.to_string(),
    );
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no chat template"),
        "{answer}"
    );
}

#[test]
fn a_chat_model_takes_a_conversation_and_names_what_it_does_not_do() {
    let w = world();
    let served = serve(w.root.join("teacher").to_str().unwrap());
    let question: Value = serde_json::from_str(
        std::fs::read_to_string(w.root.join("data/test/questions.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let image = w
        .root
        .join("data")
        .join(question["image"].as_str().unwrap());
    let text = question["text"].as_str().unwrap();
    let png = data_url(&image);
    let content = "a star";
    // A conversation: the answered round, then a follow-up.
    let follow_up = json!({"messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png}},
            {"type": "text", "text": text}]},
        {"role": "assistant", "content": content},
        {"role": "user", "content": "How many objects are there?"}],
        "max_tokens": 4, "temperature": 0.8, "seed": 3});
    let (status, answer) = http(
        &served.addr,
        "POST",
        "/v1/chat/completions",
        &follow_up.to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");

    // What it does not do.
    let refused = |body: &str, needle: &str| {
        let (status, answer) = http(&served.addr, "POST", "/v1/chat/completions", body);
        let message = answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            status == 400 && message.contains(needle),
            "{status}: {answer}"
        );
    };
    refused(
        &json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})
            .to_string(),
        "`system` messages are not supported",
    );
    refused("{not json", "not a chat-completions JSON object");
    refused(
        &json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
        .to_string(),
        "decoding the request's image",
    );
    let (status, _) = http(&served.addr, "GET", "/v1/elsewhere", "");
    assert_eq!(status, 404);
}
