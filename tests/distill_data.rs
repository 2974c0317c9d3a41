//! `mmkd distill-data` (issue 19, parts 1–3): a teacher writes a LLaVA dataset from unlabeled
//! images and a recipe; the same teacher behind `mmkd serve` writes the same data over the
//! chat-completions API; `mmkd sft` trains on it unchanged; a killed run resumes to the same
//! data; failed requests are retried, then counted and named while the run goes on; bad
//! recipes, undecodable images and another run's output directory are refused or counted.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::served::serve;
use common::world::world;
use common::{mmkd, mmkd_with_env};
use serde_json::Value;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A recipe sampled at temperature 1 (the world's tiny teacher answers nothing greedily).
fn write_recipe(dir: &Path, name: &str, templates: &str, n: usize) -> PathBuf {
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(
        &recipe,
        format!(
            "name = \"{name}\"\nseed_file = \"{name}.seed.jsonl\"\ntemplates = {templates}\n\
             [generation]\nn_per_image = {n}\nmax_tokens = 24\ntemperature = 1.0\nseed = 3\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{name}.seed.jsonl")),
        "{\"shape\": \"circle\"}\n{\"shape\": \"star\"}\n{\"shape\": \"square\"}\n",
    )
    .unwrap();
    recipe
}

fn images() -> PathBuf {
    world().root.join("data/images/train")
}

fn distill(recipe: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    distill_with_env(recipe, out, extra, &[])
}

fn distill_with_env(
    recipe: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let images = images();
    let mut args = vec![
        "distill-data",
        "--recipe",
        p(recipe),
        "--images",
        p(&images),
        "--out",
        p(out),
        "--quiet",
        "--json",
    ];
    args.extend_from_slice(extra);
    mmkd_with_env(&args, env)
}

/// `mmkd STAGE` of the world's student on a distill-data output `written` (2 steps, into `out`),
/// with `extra` arguments.
fn train_on(stage: &str, written: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let student = world().root.join("student");
    let data = written.join("data.json");
    let images = images();
    let mut args = vec![
        stage,
        "--config",
        "shapes-tiny",
        "--quiet",
        "--data",
        p(&data),
        "--images",
        p(&images),
        "--init",
        p(&student),
        "--out",
        p(out),
        "--max-steps",
        "2",
    ];
    args.extend_from_slice(extra);
    mmkd(&args)
}

fn local(teacher: &Path) -> Vec<String> {
    vec!["--teacher".into(), p(teacher).into()]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn summary(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Every prompt is accounted for: kept or dropped under one reason.
fn assert_accounted(s: &Value) {
    let dropped: u64 = s["filtered"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        s["kept"].as_u64().unwrap() + dropped,
        s["prompts"].as_u64().unwrap(),
        "{s}"
    );
}

#[test]
fn a_local_teacher_writes_data_sft_trains_on_and_the_served_teacher_writes_the_same() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        tmp.path(),
        "probe",
        "[\"What color is the {shape}?\", \"Describe the image briefly.\"]",
        3,
    );
    let teacher = w.root.join("teacher");
    let out = tmp.path().join("local");
    let mut args = local(&teacher);
    args.extend(["--limit", "8", "--batch-size", "5"].map(String::from));
    let (ok, stdout, err) = distill(&recipe, &out, &refs(&args));
    assert!(ok, "{err}");
    let s = summary(&stdout);
    assert_eq!(s["images"], 8);
    assert_eq!(s["prompts"], 24);
    assert!(s["kept"].as_u64().unwrap() > 0, "{s}");
    assert!(s["span_check"].as_bool().unwrap());
    assert_accounted(&s);

    // A LLaVA list: each record an image under --images and its kept rounds.
    let data: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("data.json")).unwrap()).unwrap();
    assert_eq!(data.len() as u64, s["records"].as_u64().unwrap());
    let rounds: usize = data
        .iter()
        .map(|r| r["conversations"].as_array().unwrap().len() / 2)
        .sum();
    assert_eq!(rounds as u64, s["kept"].as_u64().unwrap());
    for r in &data {
        assert!(images().join(r["image"].as_str().unwrap()).exists());
        let first = r["conversations"][0]["value"].as_str().unwrap();
        assert!(first.starts_with("<image>\n"), "{first}");
    }
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["job"]["teacher"]["kind"], "local");
    assert_eq!(manifest["recipe"]["name"], "probe");
    assert!(!out.join("progress").exists());

    // `mmkd sft` reads it unchanged.
    let student_out = tmp.path().join("sft");
    let (ok, _, err) = train_on("sft", &out, &student_out, &[]);
    assert!(ok, "{err}");

    // The same teacher behind the chat-completions API writes the same data (each request
    // samples from its own seed, so batching does not change it).
    let served = serve(p(&teacher));
    let api_out = tmp.path().join("api");
    let (ok, stdout, err) = distill(
        &recipe,
        &api_out,
        &[
            "--teacher-url",
            &served.url(),
            "--student",
            p(&teacher),
            "--limit",
            "8",
            "--concurrency",
            "3",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(summary(&stdout)["kept"], s["kept"]);
    assert_eq!(
        std::fs::read_to_string(api_out.join("data.json")).unwrap(),
        std::fs::read_to_string(out.join("data.json")).unwrap()
    );
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(api_out.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["job"]["teacher"]["kind"], "api");
}

#[test]
fn a_killed_run_resumes_to_the_same_data_and_other_runs_are_not_overwritten() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path(), "probe", "[\"What color is the {shape}?\"]", 2);
    let mut args = local(&w.root.join("teacher"));
    args.extend(["--limit", "6", "--chunk-images", "2"].map(String::from));
    let whole = tmp.path().join("whole");
    let (ok, _, err) = distill(&recipe, &whole, &refs(&args));
    assert!(ok, "{err}");

    let cut = tmp.path().join("cut");
    let env = [("MMKD_FAULT_EXIT_AFTER_CHUNK", "1")];
    let (ok, _, _) = distill_with_env(&recipe, &cut, &refs(&args), &env);
    assert!(!ok, "the run was not stopped");
    assert!(cut.join("progress/chunk-00000.json").exists());
    assert!(!cut.join("data.json").exists() && !cut.join("manifest.json").exists());

    // Another recipe into the unfinished run's directory is refused; the run is kept.
    let other = write_recipe(tmp.path(), "other", "[\"Where is the {shape}?\"]", 2);
    let (ok, _, err) = distill(&other, &cut, &refs(&args));
    assert!(!ok);
    assert!(
        err.contains("unfinished run of recipe probe") && err.contains("recipe"),
        "{err}"
    );
    assert!(cut.join("progress/chunk-00000.json").exists());

    let (ok, stdout, err) = distill(&recipe, &cut, &refs(&args));
    assert!(ok, "{err}");
    assert_eq!(summary(&stdout)["images_resumed"], 2);
    assert_eq!(
        std::fs::read_to_string(cut.join("data.json")).unwrap(),
        std::fs::read_to_string(whole.join("data.json")).unwrap()
    );
    // A finished run is not generated over.
    let (ok, _, err) = distill(&other, &cut, &refs(&args));
    assert!(
        !ok && err.contains("already holds a finished distill-data run (recipe probe)"),
        "{err}"
    );
}

#[test]
fn bad_recipes_are_refused_and_undecodable_images_are_counted() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let teacher = local(&w.root.join("teacher"));
    let out = tmp.path().join("out");
    let unknown = write_recipe(
        tmp.path(),
        "slots",
        "[\"Describe {aspect} of the image\"]",
        1,
    );
    let (ok, _, err) = distill(&unknown, &out, &refs(&teacher));
    assert!(!ok);
    assert!(
        err.contains("template 1") && err.contains("slot {aspect}"),
        "{err}"
    );
    let empty = write_recipe(tmp.path(), "empty", "[\"What is this?\"]", 1);
    std::fs::write(tmp.path().join("empty.seed.jsonl"), "").unwrap();
    let (ok, _, err) = distill(&empty, &out, &refs(&teacher));
    assert!(
        !ok && err.contains("empty.seed.jsonl") && err.contains("is empty"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for a bad recipe");

    // Three images and one that does not decode: named, skipped, counted.
    let folder = tmp.path().join("images");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    for name in ["000000.png", "000001.png", "000002.png"] {
        std::fs::copy(images().join(name), folder.join("sub").join(name)).unwrap();
    }
    std::fs::write(folder.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let recipe = write_recipe(tmp.path(), "probe", "[\"What color is the {shape}?\"]", 2);
    let (ok, stdout, err) = mmkd(&[
        "distill-data",
        "--teacher",
        p(&w.root.join("teacher")),
        "--recipe",
        p(&recipe),
        "--images",
        p(&folder),
        "--out",
        p(&out),
        "--quiet",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("broken.png"), "{err}");
    let s = summary(&stdout);
    assert_eq!(
        (s["images"].as_u64(), s["undecodable"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(s["prompts"], 6);
    assert!(s["messages"][0].as_str().unwrap().contains("broken.png"));
    let data = std::fs::read_to_string(out.join("data.json")).unwrap();
    assert!(data.contains("\"image\":\"sub/000000.png\""), "{data}");
}

/// A chat-completions server that fails on purpose: for a prompt about a star it replies with
/// malformed JSON; about a square, 500 then 429 before answering; otherwise "red".
fn flaky_server() -> (String, Arc<AtomicUsize>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    std::thread::spawn(move || {
        let squares = AtomicUsize::new(0);
        for mut request in server.incoming_requests() {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut body = String::new();
            request.as_reader().read_to_string(&mut body).unwrap();
            let ok = r#"{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "red"}}]}"#;
            let (status, text) = if body.contains("star") {
                (200, "{\"choices\": [".to_string())
            } else if body.contains("square") {
                match squares.fetch_add(1, Ordering::SeqCst) % 3 {
                    0 => (500, r#"{"error": {"message": "overloaded"}}"#.to_string()),
                    1 => (429, r#"{"error": {"message": "slow down"}}"#.to_string()),
                    _ => (200, ok.to_string()),
                }
            } else {
                (200, ok.to_string())
            };
            let _ =
                request.respond(tiny_http::Response::from_string(text).with_status_code(status));
        }
    });
    (format!("http://{addr}/v1"), attempts)
}

#[test]
fn failed_requests_are_retried_then_counted_and_named_while_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path(), "probe", "[\"What color is the {shape}?\"]", 2);
    let planned = mmkd::datagen::Recipe::load(p(&recipe)).unwrap();
    let keys = ["000000.png", "000001.png", "000002.png", "000003.png"];
    let prompts: Vec<String> = keys
        .iter()
        .flat_map(|k| planned.plan(k).into_iter().map(|p| p.instruction))
        .collect();
    let stars = prompts.iter().filter(|q| q.contains("star")).count();
    let squares = prompts.iter().filter(|q| q.contains("square")).count();
    assert!(
        stars > 0 && squares > 0,
        "the plan must exercise both faults: {prompts:?}"
    );

    let (url, attempts) = flaky_server();
    let out = tmp.path().join("out");
    let (ok, stdout, err) = distill(
        &recipe,
        &out,
        &[
            "--teacher-url",
            &url,
            "--limit",
            "4",
            "--retries",
            "2",
            "--backoff",
            "0",
            "--concurrency",
            "1",
        ],
    );
    assert!(ok, "{err}");
    let s = summary(&stdout);
    assert_eq!(s["prompts"], 8);
    assert_eq!(
        s["filtered"]["request_failed"].as_u64(),
        Some(stars as u64),
        "{s}"
    );
    assert_eq!(s["kept"].as_u64(), Some((8 - stars) as u64), "{s}");
    assert!(
        !s["span_check"].as_bool().unwrap(),
        "no model to tokenize with"
    );
    let named = s["messages"][0].as_str().unwrap();
    assert!(
        named.contains("star") && named.contains("malformed") && named.contains("3 attempt"),
        "{named}"
    );
    // Each star prompt tried 3 times, each square 3 times (500, 429, then an answer).
    let expected = 3 * stars + 3 * squares + (8 - stars - squares);
    assert_eq!(attempts.load(Ordering::SeqCst), expected);

    // A refusing endpoint (nothing listening) fails every request: nothing usable, said so.
    let dead = tmp.path().join("dead");
    let (ok, _, err) = distill(
        &recipe,
        &dead,
        &[
            "--teacher-url",
            "http://127.0.0.1:9/v1",
            "--limit",
            "1",
            "--retries",
            "1",
            "--backoff",
            "0",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("nothing usable")
            && err.contains("request_failed 2")
            && err.contains("127.0.0.1:9"),
        "{err}"
    );
}

#[test]
fn kept_log_probabilities_are_a_teacher_cache_dft_trains_from() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(tmp.path(), "probe", "[\"What color is the {shape}?\"]", 2);
    let out = tmp.path().join("out");
    let mut args = local(&w.root.join("teacher"));
    args.extend(
        [
            "--limit",
            "6",
            "--keep-logprobs",
            "8",
            "--config",
            "shapes-tiny",
        ]
        .map(String::from),
    );
    let (ok, _, err) = distill(&recipe, &out, &refs(&args));
    assert!(ok, "{err}");
    assert!(out.join("teacher-cache/manifest.json").exists());
    let dft = tmp.path().join("dft");
    let cache = out.join("teacher-cache");
    let (ok, _, err) = train_on("dft", &out, &dft, &["--teacher-cache", p(&cache)]);
    assert!(ok, "{err}");
    // A server's top_logprobs: kept at the answer tokens in the student's tokenization, one
    // question a record; no image-token rows, so a DFT reading them is refused, one without
    // them trains.
    let served = serve(p(&w.root.join("teacher")));
    let api = tmp.path().join("api");
    let (ok, stdout, err) = distill(
        &recipe,
        &api,
        &[
            "--teacher-url",
            &served.url(),
            "--student",
            p(&w.root.join("student")),
            "--template",
            "compact",
            "--limit",
            "6",
            "--keep-logprobs",
            "5",
            "--config",
            "shapes-tiny",
        ],
    );
    assert!(ok, "{err}");
    let s = summary(&stdout);
    assert_accounted(&s);
    let data: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(api.join("data.json")).unwrap()).unwrap();
    assert_eq!(
        data.len() as u64,
        s["kept"].as_u64().unwrap(),
        "one question a record"
    );
    assert!(!data.is_empty(), "{s}");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(api.join("teacher-cache/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["visual"], false);
    assert_eq!(manifest["top_k"], 5);
    assert_eq!(manifest["samples"].as_u64(), Some(data.len() as u64));
    let api_cache = api.join("teacher-cache");
    let dft = |out: &Path, sets: &[&str]| {
        let mut extra = vec!["--teacher-cache", p(&api_cache)];
        for set in sets {
            extra.extend(["--set", set]);
        }
        train_on("dft", &api, out, &extra)
    };
    let (ok, _, err) = dft(&tmp.path().join("dft-vis"), &[]);
    assert!(
        !ok && err.contains("no distributions at the image tokens"),
        "{err}"
    );
    let no_visual = ["distill.beta_vis=0", "distill.gamma_rel=0"];
    let (ok, _, err) = dft(&tmp.path().join("dft-api"), &no_visual);
    assert!(ok, "{err}");
    let metrics = std::fs::read_to_string(tmp.path().join("dft-api/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"l_res\":"), "{metrics}");
    // Without a student the server's tokens have no ids to be kept as.
    let (ok, _, err) = distill(
        &recipe,
        &tmp.path().join("api-2"),
        &[
            "--teacher-url",
            &served.url(),
            "--keep-logprobs",
            "5",
            "--config",
            "shapes-tiny",
        ],
    );
    assert!(!ok && err.contains("needs --student"), "{err}");
}
