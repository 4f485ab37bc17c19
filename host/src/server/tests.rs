//! In-process tests of the router on the built-in tiny model: each request goes through
//! `tower::ServiceExt::oneshot`, without a socket. They cover the endpoint shapes, streaming,
//! usage, the error bodies and the default-model message; `tests/python/` drives the real binary
//! with the official SDK.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use clap::Parser;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::metrics::{MetricsIdentity, ServerMetrics, TracingInfo};
use super::state::AppState;
use crate::cli::{Cli, Command};
use crate::engine::EngineHandle;
use crate::step_tracing::TracerMetrics;

fn start(extra: &[&str]) -> (Router, EngineHandle) {
    start_with(
        extra,
        Box::new(crate::engine::NoopStepObserver),
        super::http::DEFAULT_HEALTH_STALL_TIMEOUT,
    )
}

/// [`start`] with a step observer and `/health`'s stall bound.
fn start_with(
    extra: &[&str],
    observer: Box<dyn crate::engine::StepObserver>,
    health_stall_timeout: std::time::Duration,
) -> (Router, EngineHandle) {
    let mut argv = vec![
        "stepscope",
        "serve",
        "builtin:tiny",
        "--num-kv-blocks",
        "64",
    ];
    argv.extend_from_slice(extra);
    let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    let launched = crate::launch::launch("builtin:tiny", &args.engine, observer).unwrap();
    let tracer = Arc::new(TracerMetrics::default());
    let metrics = Arc::new(ServerMetrics::new(
        launched.engine.clone(),
        tracer,
        TracingInfo::default(),
        MetricsIdentity::for_model(&launched.model.name, &launched.engine),
    ));
    let mut state = AppState::new(
        launched.engine.clone(),
        launched.model.clone(),
        args.served_model_name.clone(),
        "builtin:tiny",
        metrics,
    );
    state.health_stall_timeout = health_stall_timeout;
    (super::routes::router(state), launched.engine)
}

async fn call(app: &Router, method: &str, path: &str, body: Option<&str>) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = call(app, "POST", path, Some(&body.to_string())).await;
    (status, serde_json::from_str(&text).unwrap())
}

fn assert_error(status: StatusCode, body: &Value, expected: u16, param: Option<&str>) {
    assert_eq!(status.as_u16(), expected, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("code").is_some() && error.get("param").is_some(),
        "{body}"
    );
    if let Some(param) = param {
        assert_eq!(error["param"], param, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_chat_models_and_health() {
    let (app, engine) = start(&["--served-model-name", "tiny"]);
    let (status, body) = call(&app, "GET", "/health", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    let (_, models) = call(&app, "GET", "/v1/models", None).await;
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let request = json!({"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0,
                         "ignore_eos": true, "return_token_ids": true});
    let (status, body) = post(&app, "/v1/completions", request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["choices"][0]["token_ids"].as_array().unwrap().len(), 5);
    // Greedy is deterministic: the same request gives the same tokens.
    let (_, again) = post(&app, "/v1/completions", request).await;
    assert_eq!(
        again["choices"][0]["token_ids"],
        body["choices"][0]["token_ids"]
    );
    // The spec the server was started with is accepted as a name too.
    let (status, _) = post(
        &app,
        "/v1/completions",
        json!({"model": "builtin:tiny", "prompt": [1, 2, 3], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                      "max_completion_tokens": 4, "temperature": 0, "ignore_eos": true});
    let (status, body) = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(
        body["usage"]["total_tokens"].as_u64(),
        Some(body["usage"]["prompt_tokens"].as_u64().unwrap() + 4)
    );

    let (status, metrics) = call(&app, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains(
            "vllm:request_success_total{model_name=\"builtin:tiny\",engine=\"0\",finished_reason=\"length\"} 4"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE vllm:time_to_first_token_seconds histogram"));
    assert!(
        metrics.contains(
            "vllm:iteration_tokens_total_count{model_name=\"builtin:tiny\",engine=\"0\"}"
        )
    );
    assert!(metrics.contains("vllm:cache_config_info{block_size=\"16\","));
    assert!(metrics.contains("stepscope_policy_faults_total{kind=\"timeout\"} 0"));
    engine.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_with_usage_and_done() {
    let (app, engine) = start(&[]);
    let request = json!({"prompt": "abc", "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                         "stream": true, "stream_options": {"include_usage": true}});
    let (status, text) = call(&app, "POST", "/v1/completions", Some(&request.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .collect();
    assert_eq!(finish[finish.len() - 2], "length");
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null())
    );

    let chat = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      "max_tokens": 3, "temperature": 0, "ignore_eos": true, "stream": true});
    let (status, text) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(&chat.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.contains("\"role\":\"assistant\""));
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(!text.contains("\"usage\""));
    engine.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let (app, engine) = start(&["--max-model-len", "64"]);
    let (status, text) = call(&app, "POST", "/v1/completions", Some("{\"prompt\": ")).await;
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_error(status, &body, 400, None);
    assert_eq!(body["error"]["code"], "invalid_json");
    let (status, text) = call(&app, "POST", "/v1/chat/completions", Some("[1]")).await;
    assert_error(status, &serde_json::from_str(&text).unwrap(), 400, None);

    let cases = [
        (
            "/v1/completions",
            json!({"model": "gpt-4", "prompt": "x"}),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x".repeat(100)}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 100}),
            400,
            Some("max_tokens"),
        ),
        // A misspelt field is refused by name, on both endpoints, never ignored.
        (
            "/v1/completions",
            json!({"prompt": "x", "max_token": 3}),
            400,
            Some("max_token"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "temprature": 0}),
            400,
            Some("temprature"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": -1}),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": "hot"}),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 0}),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["x", "y"], "n": 129}),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["x", [1, 2], 3]}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": [999999]}),
            400,
            Some("prompt"),
        ),
        ("/v1/completions", json!({}), 400, Some("prompt")),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}),
            400,
            Some("top_p"),
        ),
    ];
    for (path, request, expected, param) in cases {
        let (status, body) = post(&app, path, request.clone()).await;
        assert_error(status, &body, expected, param);
    }
    let (status, text) = call(&app, "GET", "/v1/nothing", None).await;
    assert_error(status, &serde_json::from_str(&text).unwrap(), 404, None);
    let (status, text) = call(&app, "GET", "/v1/completions", None).await;
    assert_error(status, &serde_json::from_str(&text).unwrap(), 405, None);
    let (_, metrics) = call(&app, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("stepscope_requests_rejected_total{reason=\"model_not_found\"} 1"),
        "{metrics}"
    );
    engine.shutdown().unwrap();
}

#[test]
fn a_missing_default_model_names_the_setup_command() {
    let error = super::resolve_model_spec(None, |_| Some("/nonexistent/model".into())).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("./scripts/setup-default-model.sh"),
        "{message}"
    );
    assert!(message.contains("/nonexistent/model"), "{message}");
    assert_eq!(
        super::resolve_model_spec(Some("builtin:tiny"), |_| None).unwrap(),
        "builtin:tiny"
    );
}

#[test]
fn serve_flags_parse() {
    let cli = Cli::try_parse_from([
        "stepscope",
        "serve",
        "builtin:tiny",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--served-model-name",
        "a",
        "--served-model-name",
        "b",
        "c",
        "--api-key",
        "k",
        "--max-waiting-requests",
        "3",
        "--step-tracing-enabled",
        "--step-tracing-file",
        "/tmp/x.jsonl",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    assert_eq!((args.host.as_str(), args.port), ("0.0.0.0", 9000));
    assert_eq!(
        args.served_model_name,
        ["a", "b", "c"],
        "repeated, and several after one flag"
    );
    assert_eq!(args.to_config().unwrap().api_keys, ["k"]);
    assert_eq!(args.engine.max_waiting_requests, 3);
    assert!(args.step_tracing.step_tracing_enabled);
    let defaults = Cli::try_parse_from(["stepscope", "serve"]).unwrap();
    let Command::Serve(args) = defaults.command else {
        unreachable!()
    };
    assert_eq!(
        (args.host.as_str(), args.port, args.model),
        ("127.0.0.1", 8000, None)
    );
}

async fn admin_call(app: &Router, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn admin_api_swaps_refuses_and_reports() {
    use crate::policy::{PolicyLimits, PolicyModule, PolicySource};
    use crate::step_tracing::PolicySwitch;
    let module =
        PolicyModule::load(&PolicySource::BuiltinDefault, PolicyLimits::default()).unwrap();
    let params = crate::policy::PolicyParams::rates(0.1, 0.0);
    let switch = Arc::new(PolicySwitch::new(&module, params, 0, Arc::default(), 1));
    let app = super::admin::router(super::admin::AdminState {
        switch: Some(Arc::clone(&switch)),
    });

    let (status, body) = admin_call(&app, "GET", "/admin/policy", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["active"]["name"], "builtin:default");
    assert_eq!(body["params"][0], json!(["sample_rate", "0.1"]));

    let pressure = std::fs::read(
        std::path::Path::new(crate::policy::GUEST_COMPONENT_DIR).join("pressure.wasm"),
    )
    .unwrap();
    let (status, body) = admin_call(&app, "POST", "/admin/policy", pressure).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["name"].as_str().unwrap().starts_with("upload:"),
        "{body}"
    );
    assert_eq!(body["origin"], "admin");

    let (status, body) = admin_call(&app, "POST", "/admin/policy", Vec::new()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("empty"),
        "{body}"
    );
    let (status, body) =
        admin_call(&app, "POST", "/admin/policy?name=x", b"\0asm junk".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "policy_refused");
    let (status, body) = admin_call(&app, "GET", "/admin/policy", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["swaps"].as_u64(), body["swaps_refused"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(body["active"]["digest"], switch.active().digest);
    let (status, _) = admin_call(&app, "DELETE", "/admin/policy", Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let huge = vec![0u8; super::admin::MAX_POLICY_UPLOAD_BYTES + 1];
    let (status, body) = admin_call(&app, "POST", "/admin/policy", huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "policy_refused", "{body}");

    // With step tracing off there is nothing to replace: 409.
    let off = super::admin::router(super::admin::AdminState { switch: None });
    let (status, body) = admin_call(&off, "POST", "/admin/policy", b"\0asm".to_vec()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "step_tracing_disabled");
    let (status, body) = admin_call(&off, "GET", "/admin/policy", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["step_tracing_enabled"], false);
}

#[test]
fn admin_flags_parse_and_the_host_needs_the_port() {
    let cli = Cli::try_parse_from(["stepscope", "serve", "--admin-port", "0"]).unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    assert_eq!(
        (args.admin_port, args.admin_host.as_str()),
        (Some(0), "127.0.0.1")
    );
    let cli = Cli::try_parse_from(["stepscope", "serve"]).unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    assert_eq!(args.admin_port, None, "the admin API is off by default");
    assert!(Cli::try_parse_from(["stepscope", "serve", "--admin-host", "0.0.0.0"]).is_err());
}

/// `/health` is a 503 `engine_stalled` while a step never returns with a request pending (a
/// blocking step observer stands for a policy stuck in a host call), and 200 again once it
/// returns. The bound is 1 ms and the test waits 50 ms past the observer's entry, so the outcome
/// does not depend on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_stalled_engine() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let mut blocked = false;
    let observer = move |_: &crate::engine::StepView<'_>| {
        if !blocked {
            blocked = true;
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        }
    };
    let bound = std::time::Duration::from_millis(1);
    let (app, engine) = start_with(&["--served-model-name", "tiny"], Box::new(observer), bound);
    // Idle: healthy, however long ago the last step was.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(call(&app, "GET", "/health", None).await.0, StatusCode::OK);

    let request = json!({"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": true});
    let pending = tokio::spawn({
        let app = app.clone();
        async move { post(&app, "/v1/completions", request).await }
    });
    tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (status, body) = call(&app, "GET", "/health", None).await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_error(status, &body, 503, None);
    assert_eq!(body["error"]["code"], "engine_stalled");

    release_tx.send(()).unwrap();
    let (status, body) = pending.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // Done: back to idle, so healthy again (polled: the engine thread goes idle just after the
    // answer's last token).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while call(&app, "GET", "/health", None).await.0 != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "never healthy again");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    engine.shutdown().unwrap();
}

/// The description covers every route of the router, and each path answers as described.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_every_route() {
    let (app, engine) = start(&["--served-model-name", "tiny"]);
    let (status, text) = call(&app, "GET", "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let mut described: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    described.sort();
    let expected = [
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/models"),
        ("GET", "/version"),
        ("POST", "/detokenize"),
        ("POST", "/tokenize"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ];
    assert_eq!(
        described,
        expected.map(|(m, p)| (m.to_string(), p.to_string()))
    );
    // Every described route exists: none is a 404 or a 405 from the fallbacks.
    for (method, path) in expected {
        let (status, _) = call(&app, method, path, Some("{}")).await;
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {status}"
        );
    }
    engine.shutdown().unwrap();
}
