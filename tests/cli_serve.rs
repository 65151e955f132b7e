//! `pipeline serve` end to end: the real binary on a free loopback port, serving a tiny
//! class-conditional model, driven over plain HTTP/1.1 (std::net, no client crate).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::*;
use serde_json::{Value, json};

/// A tiny VAE and a tiny class-conditional LDM trained a few steps in `vae/` and `ldm/`, with
/// T = 1000 so that a slow job is easy to make.
fn tiny_model() -> TinyVae {
    let t = TinyVae::trained();
    let config = TinyLdmConfig {
        timesteps: 1000,
        sample_every: 4,
        checkpoint_every: 4,
        ..Default::default()
    };
    std::fs::write(t.path("ldm.toml"), config.toml()).unwrap();
    assert_ok(&t.train_ldm("ldm.toml", "ldm", &[]));
    t
}

/// A running `pipeline serve --port 0`; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// Starts the server and reads the address it prints (`serving http://ADDR/ ...`).
    fn start(model: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["serve", "--model", &model.display().to_string()])
            .args(["--port", "0", "--device", "cpu"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the pipeline binary runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("serving http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no address on stdout: {line:?}"))
            .to_string();
        Self { child, addr }
    }

    fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, &[], b"")
    }

    /// `POST /api/generate` with a JSON body.
    fn generate(&self, body: &Value) -> Response {
        self.post_json("/api/generate", body.to_string().as_bytes(), &[])
    }

    fn post_json(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Response {
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        request(&self.addr, "POST", path, &h, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request with `Connection: close`; the answer read to its end (chunked
/// bodies decoded).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head += &format!("Host: {addr}\r\n");
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers: head,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

/// The PNG images of an answer, and the `parameters` text chunk of each.
fn images(answer: &Value) -> Vec<(Vec<u8>, String)> {
    answer["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b64| {
            let png = BASE64.decode(b64.as_str().unwrap()).unwrap();
            let reader = png::Decoder::new(std::io::Cursor::new(png.clone()))
                .read_info()
                .unwrap();
            let text = reader
                .info()
                .uncompressed_latin1_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .map(|c| c.text.clone())
                .expect("a parameters chunk");
            (png, text)
        })
        .collect()
}

/// Asserts a 4xx answer whose JSON error names `field` (and says `needle`).
fn assert_field_error(r: &Response, status: u16, field: Option<&str>, needle: &str) {
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, status, "{body}");
    assert!(!body.contains('\n'), "not one line: {body}");
    let e = r.json();
    assert_eq!(e["field"].as_str(), field, "{body}");
    let message = e["error"].as_str().unwrap();
    if let Some(f) = field {
        assert!(message.starts_with(f), "{body}");
    }
    assert!(message.contains(needle), "{needle:?} not in {body}");
}

/// A `side x side` grayscale PNG.
fn gray_png(side: usize, value: u8) -> String {
    let png = ldm_common::image_io::encode_png(&vec![value; side * side], side, side, 1, &[]);
    BASE64.encode(png)
}

#[test]
fn api_generates_and_names_every_bad_field() {
    let t = tiny_model();
    let server = Server::start(
        &t.path("ldm"),
        &["--max-images", "4", "--max-body", "200000"],
    );

    let m = server.get("/api/model");
    assert_eq!(m.status, 200);
    let m = m.json();
    assert_eq!(
        m["classes"],
        json!(["top-left", "top-right", "bottom-left", "bottom-right"])
    );
    assert_eq!(m["conditioning"], "class");
    assert_eq!(m["timesteps"], 1000);
    assert_eq!(m["image_shape"], json!([1, 32, 32]));
    assert_eq!(m["limits"]["max_images"], 4);
    assert!(
        m["samplers"]
            .as_array()
            .unwrap()
            .contains(&json!("dpm-solver++"))
    );
    assert_eq!(
        m["spacings"],
        json!(["leading", "trailing", "linspace", "karras"])
    );
    let sha = ldm_common::checkpoint::sha256_file(&t.path("ldm/model.safetensors")).unwrap();
    assert_eq!(m["model_sha256"], sha);

    // A valid request: n PNGs whose settings chunk is the request, resolved.
    let req = json!({"class": "top-right", "cfg": 3, "sampler": "dpm-solver++", "steps": 7, "n": 3, "seed": 11});
    let r = server.generate(&req);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let a = r.json();
    let pngs = images(&a);
    assert_eq!(pngs.len(), 3);
    for (i, (_, text)) in pngs.iter().enumerate() {
        let (settings, index) = text.rsplit_once(" index ").unwrap();
        assert_eq!(index, i.to_string());
        let s: Value = serde_json::from_str(settings).unwrap();
        assert_eq!(s["class"], "top-right");
        assert_eq!(s["cfg"], 3.0);
        assert_eq!(s["sampler"]["kind"], "dpm-solver++");
        assert_eq!(s["sampler"]["steps"], 7);
        assert_eq!((s["n"].clone(), s["seed"].clone()), (json!(3), json!(11)));
        assert_eq!(s["model_sha256"], sha);
    }
    assert_eq!(a["settings"]["seed"], 11);
    assert_eq!(
        a["settings"]["files"],
        json!(["000.png", "001.png", "002.png"])
    );
    // The same seed gives identical bytes; another seed other images.
    let again = server.generate(&req).json();
    assert_eq!(again["images"], a["images"]);
    let mut other = req.clone();
    other["seed"] = json!(12);
    assert_ne!(server.generate(&other).json()["images"], a["images"]);
    // The same bytes as `pipeline generate` writes for the same settings.
    let generate = |out: &str, extra: &[&str]| {
        let (model, out) = (t.p("ldm"), t.p(out));
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--class",
            "top-right",
            "--cfg",
            "3",
            "--sampler",
            "dpm-solver++",
            "--steps",
            "7",
            "-n",
            "3",
            "--seed",
            "11",
            "--out",
            &out,
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        pipeline(&args)
    };
    let o = generate("g", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(t.path("g/001.png")).unwrap(), pngs[1].0);
    // "trajectory": true adds generate --trajectory's PNG, the same bytes; the images stay.
    assert!(a["trajectory"].is_null());
    let mut with_trajectory = req.clone();
    with_trajectory["trajectory"] = json!(true);
    let tr = server.generate(&with_trajectory).json();
    assert_eq!(tr["images"], a["images"]);
    assert_eq!(
        tr["settings"]["trajectory"]["steps"],
        json!([1, 2, 3, 4, 5, 6, 7])
    );
    let png = BASE64.decode(tr["trajectory"].as_str().unwrap()).unwrap();
    let o = generate("gt", &["--trajectory"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(t.path("gt/trajectory.png")).unwrap(), png);
    // No seed: one is drawn, and the answer says which.
    let drawn = server
        .generate(&json!({"prompt": "a bottom-left", "n": 1}))
        .json();
    let seed = drawn["settings"]["seed"].as_u64().expect("the seed used");
    assert_eq!(drawn["settings"]["class"], "bottom-left");
    let replay = server.generate(&json!({"prompt": "a bottom-left", "n": 1, "seed": seed}));
    assert_eq!(replay.json()["images"], drawn["images"]);

    // Image to image from an upload, and inpainting with a mask.
    let i2i = server.generate(&json!({"class": "top-left", "init_image": gray_png(32, 200), "strength": 0.5, "steps": 10, "n": 2, "seed": 3}));
    assert_eq!(i2i.status, 200, "{}", String::from_utf8_lossy(&i2i.body));
    let i2i = i2i.json();
    assert_eq!(i2i["settings"]["img2img"]["strength"], 0.5);
    assert_eq!(images(&i2i).len(), 2);
    assert!(i2i["init_reconstruction"].is_string());
    let paint = server.generate(&json!({"class": "top-left", "init_image": gray_png(32, 200), "mask": gray_png(32, 255), "steps": 10, "n": 1, "seed": 3}));
    assert_eq!(
        paint.status,
        200,
        "{}",
        String::from_utf8_lossy(&paint.body)
    );
    assert!(paint.json()["settings"]["img2img"]["mask_sha256"].is_string());
    let rescaled = server.generate(&json!({"class": "top-left", "cfg": 5, "guidance_rescale": 0.7, "steps": 5, "n": 1, "seed": 3}));
    assert_eq!(
        rescaled.status,
        200,
        "{}",
        String::from_utf8_lossy(&rescaled.body)
    );
    assert_eq!(
        rescaled.json()["settings"]["sampler"]["guidance_rescale"],
        0.7
    );

    // Every bad field: a 4xx with a one-line JSON error naming it.
    let bad = |body: Value, field: &str, needle: &str| {
        assert_field_error(&server.generate(&body), 422, Some(field), needle);
    };
    bad(json!({"sampler": "euler"}), "sampler", "ddim");
    bad(json!({"class": "dog"}), "class", "top-left");
    bad(json!({"steps": 0}), "steps", "expected 1 to 1000");
    bad(json!({"steps": 1001}), "steps", "expected 1 to 1000");
    bad(json!({"steps": "ten"}), "steps", "expected an integer");
    bad(json!({"n": 5}), "n", "expected 1 to 4");
    bad(json!({"n": 0}), "n", "expected 1 to 4");
    bad(json!({"cfg": "abc"}), "cfg", "expected a number");
    bad(
        json!({"trajectory": "yes"}),
        "trajectory",
        "expected true or false",
    );
    bad(json!({"cfg": -1}), "cfg", "expected a number >= 0");
    bad(json!({"eta": 2}), "eta", "[0, 1]");
    bad(
        json!({"spacing": "middle"}),
        "spacing",
        "one of leading, trailing, linspace, karras",
    );
    bad(json!({"clip_x0": -1}), "clip_x0", "a positive number");
    bad(
        json!({"guidance_rescale": 2}),
        "guidance_rescale",
        "a number in [0, 1]",
    );
    bad(
        json!({"guidance_rescale": "high"}),
        "guidance_rescale",
        "a number",
    );
    bad(json!({"seed": -1}), "seed", "expected an integer");
    bad(
        json!({"prompt": "a giraffe"}),
        "prompt",
        "names none of its classes",
    );
    bad(
        json!({"prompt": "x".repeat(1001)}),
        "prompt",
        "longer than 1000",
    );
    bad(
        json!({"class": "top-left", "negative_prompt": "a giraffe"}),
        "negative_prompt",
        "names none",
    );
    bad(json!({"init_image": "%%%"}), "init_image", "not base64");
    bad(
        json!({"init_image": BASE64.encode(b"not an image")}),
        "init_image",
        "unreadable image",
    );
    let bomb = BASE64.encode(ldm_common::image_io::bomb_png(60_000));
    bad(
        json!({"init_image": bomb}),
        "init_image",
        "refused to decode",
    );
    bad(
        json!({"init_image": gray_png(40, 9)}),
        "init_image",
        "40x40 pixels",
    );
    bad(
        json!({"init_image": gray_png(32, 9), "strength": 0}),
        "strength",
        "(0, 1]",
    );
    bad(json!({"mask": gray_png(32, 9)}), "mask", "needs init_image");
    bad(json!({"strength": 0.5}), "strength", "needs init_image");
    bad(
        json!({"classifier_scale": 2}),
        "classifier_scale",
        "no classifier",
    );
    bad(json!({"file": "/etc/passwd"}), "file", "unknown field");
    let r = server.post_json("/api/generate", b"{\"class\": ", &[]);
    assert_field_error(&r, 400, None, "malformed JSON");
    let r = server.post_json("/api/generate", b"[1, 2]", &[]);
    assert_field_error(&r, 400, None, "expected a JSON object");
    // One byte over the limit (so the server has read it all when it answers).
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(200_001 - 14));
    assert_eq!(big.len(), 200_001);
    let r = server.post_json("/api/generate", big.as_bytes(), &[]);
    assert_field_error(&r, 413, None, "larger than 200000 bytes");
    let r = request(
        &server.addr,
        "POST",
        "/api/generate",
        &[("Content-Type", "text/plain")],
        b"{}",
    );
    assert_field_error(&r, 415, None, "application/json");
    let r = request(
        &server.addr,
        "GET",
        "/api/model",
        &[("Host", "evil.example")],
        b"",
    );
    assert_eq!(r.status, 421);
    assert_field_error(&server.get("/api/nothing"), 404, None, "no such route");
    assert_field_error(
        &server.post_json("/api/jobs/77/cancel", b"", &[]),
        404,
        None,
        "job 77",
    );

    // The page and its assets come from the binary.
    let page = server.get("/");
    assert_eq!(page.status, 200);
    let html = String::from_utf8_lossy(&page.body);
    assert!(
        html.contains("id=\"prompt\"") && html.contains("/app.js"),
        "{html}"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page fetches from outside"
    );
    let js = server.get("/app.js");
    assert_eq!(js.status, 200);
    assert!(js.headers.to_ascii_lowercase().contains("text/javascript"));
    assert_eq!(server.get("/style.css").status, 200);

    // Still serving after all that.
    assert_eq!(server.generate(&req).json()["images"], a["images"]);
}

/// Reads server-sent events from an open response until one named `until`; returns them.
fn read_events(reader: &mut impl BufRead, until: &str) -> Vec<(String, Value)> {
    let mut events = vec![];
    let mut name = String::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended: {events:?}"
        );
        let line = line.trim_end();
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(data).unwrap()));
            if name == until {
                return events;
            }
        }
    }
}

#[test]
fn a_full_queue_answers_429_and_jobs_can_be_cancelled() {
    let t = tiny_model();
    let server = Server::start(&t.path("ldm"), &["--queue", "0"]);
    // A slow job (1000 Langevin steps), followed as server-sent events.
    let body =
        json!({"class": "top-left", "sampler": "langevin", "steps": 1000, "n": 4}).to_string();
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write!(
        stream,
        "POST /api/generate HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    )
    .unwrap();
    // (the chunk-size lines of the chunked body carry no "event:"/"data:" prefix)
    let mut reader = BufReader::new(stream);
    let events = read_events(&mut reader, "progress");
    assert_eq!(events[0].0, "queued");
    let id = events[0].1["id"].as_u64().unwrap();
    assert_eq!(events.last().unwrap().1["total"], 1000);

    // One job runs, none may wait: the next request is refused with 429 and a JSON error.
    let r = server.generate(&json!({"class": "top-left", "n": 1}));
    assert_field_error(&r, 429, None, "busy");
    // Another client can follow the running job.
    let mut follower = TcpStream::connect(&server.addr).unwrap();
    write!(
        follower,
        "GET /api/jobs/{id}/events HTTP/1.1\r\nHost: {}\r\n\r\n",
        server.addr
    )
    .unwrap();
    follower
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut follower = BufReader::new(follower);
    read_events(&mut follower, "progress");

    // Cancel it: its stream ends with `cancelled` before the last step.
    let r = server.post_json(&format!("/api/jobs/{id}/cancel"), b"", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["cancelled"], true);
    let events = read_events(&mut reader, "cancelled");
    let (_, last) = events.last().unwrap();
    assert!(last["step"].as_u64().unwrap() < 1000, "{last}");
    read_events(&mut follower, "cancelled");

    // The worker is free again: the next request gets its image.
    let r = server.generate(&json!({"class": "top-left", "n": 1, "seed": 1}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(images(&r.json()).len(), 1);
}

/// `serve --precision bf16` casts the weights once at start and samples every request in bf16:
/// the same bytes as `generate --precision bf16`, recorded in the settings.
#[test]
fn serve_samples_in_bf16_as_generate_does() {
    let t = tiny_model();
    let server = Server::start(&t.path("ldm"), &["--precision", "bf16"]);
    let req = json!({"class": "top-left", "cfg": 2, "steps": 3, "n": 2, "seed": 5});
    let r = server.generate(&req);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let a = r.json();
    assert_eq!(a["settings"]["sampler"]["precision"], "bf16");
    let (model, out) = (t.p("ldm"), t.p("g"));
    let args = [
        "generate",
        "--model",
        &model,
        "--class",
        "top-left",
        "--cfg",
        "2",
        "--steps",
        "3",
        "-n",
        "2",
        "--seed",
        "5",
        "--out",
        &out,
        "--device",
        "cpu",
        "--precision",
        "bf16",
    ];
    assert_ok(&pipeline(&args));
    assert_eq!(std::fs::read(t.path("g/001.png")).unwrap(), images(&a)[1].0);
}

#[test]
fn serve_refuses_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let o = pipeline(&[
        "serve",
        "--model",
        &dir.path().display().to_string(),
        "--port",
        "0",
    ]);
    assert_error(&o, "LDM run");
    let o = pipeline(&[
        "serve",
        "--model",
        "x",
        "--host",
        "not an address",
        "--port",
        "0",
    ]);
    assert_error(&o, "--host not an address");
    let o = pipeline(&["serve", "--model", "x", "--max-images", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--max-images"), "{}", stderr(&o));
}
