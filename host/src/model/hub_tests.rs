//! Hub ids against a fixture laid out as a real Hugging Face cache: `models--org--name` with
//! `blobs/` (content files), `snapshots/<commit>/` (relative symlinks into `blobs/`) and
//! `refs/<branch>` (the commit). The built-in tiny model, exported as a Hugging Face directory,
//! is the content.

use std::path::{Path, PathBuf};

use super::*;
use crate::model::{load_model_files, tiny};
use crate::testing::export::export_hf_dir;

const MAIN: &str = "1111111111111111111111111111111111111111";
const V2: &str = "2222222222222222222222222222222222222222";

struct Fixture(PathBuf);

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A hub cache holding `org/tiny` at `main` (commit MAIN) and at branch `v2` (commit V2, whose
/// snapshot lacks its weights), and `org/ghost` with refs but no snapshot.
fn hub_cache(name: &str) -> Fixture {
    let root = std::env::temp_dir().join(format!("stepscope-hub-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let export = root.join("export");
    export_hf_dir(&tiny::tiny_model(), &export, false).expect("export");
    let repo = root.join("hub/models--org--tiny");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (commit, with_weights) in [(MAIN, true), (V2, false)] {
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        for entry in std::fs::read_dir(&export).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_str().unwrap().to_string();
            if !with_weights && file.ends_with(".safetensors") {
                continue;
            }
            let blob = format!("{commit}-{file}");
            std::fs::copy(&path, repo.join("blobs").join(&blob)).unwrap();
            std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snapshot.join(&file))
                .unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN).unwrap();
    std::fs::write(repo.join("refs/v2"), V2).unwrap();
    std::fs::create_dir_all(root.join("hub/models--org--ghost/refs")).unwrap();
    std::fs::write(root.join("hub/models--org--ghost/refs/main"), MAIN).unwrap();
    let _ = std::fs::remove_dir_all(&export);
    Fixture(root)
}

fn settings(fixture: &Fixture, revision: Option<&str>, offline: bool) -> HubSettings {
    HubSettings {
        cache_dir: fixture.0.join("hub"),
        revision: revision.map(str::to_string),
        offline,
        // Nothing listens on port 9: an online lookup fails at once, as with no network.
        endpoint: Some("http://127.0.0.1:9".into()),
        token: None,
        download_timeout: DEFAULT_DOWNLOAD_TIMEOUT,
    }
}

#[test]
fn ids_are_org_slash_name_and_never_an_existing_path() {
    assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
    assert!(is_hub_id("org/model.v1_2"));
    for not in [
        "builtin:tiny",
        "model",
        "a/b/c",
        "/abs/path",
        "./rel",
        "org/",
        "/name",
        "../x",
    ] {
        assert!(!is_hub_id(not), "{not}");
    }
    // Cargo runs unit tests in the package directory, where `src/model` exists.
    assert!(Path::new("src/model").is_dir());
    assert!(
        !is_hub_id("src/model"),
        "an existing directory is a directory"
    );
}

#[test]
fn the_cache_follows_refs_main_revisions_and_commit_hashes() {
    let fixture = hub_cache("refs");
    let main = resolve("org/tiny", &settings(&fixture, None, true)).expect("main");
    assert!(main.ends_with(format!("models--org--tiny/snapshots/{MAIN}")));
    // Snapshot files are symlinks into blobs/, and the loader follows them.
    assert!(
        std::fs::symlink_metadata(main.join("config.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let loaded = load_model_files(main.to_str().unwrap()).expect("load the snapshot");
    assert_eq!(loaded.info.vocab_size, tiny::tiny_model().info.vocab_size);
    let by_hash = resolve("org/tiny", &settings(&fixture, Some(MAIN), true)).expect("hash");
    assert_eq!(by_hash, main);
    // Branch v2's snapshot has no weights: not a usable cached model, and offline that is the
    // one-line error naming where it looked.
    let error = resolve("org/tiny", &settings(&fixture, Some("v2"), true))
        .unwrap_err()
        .to_string();
    let tried = fixture.0.join("hub/models--org--tiny/snapshots");
    assert!(error.contains(&tried.display().to_string()), "{error}");
    assert!(
        error.contains("revision v2") && error.contains("HF_HUB_OFFLINE"),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
}

#[test]
fn a_missing_model_offline_or_unreachable_is_one_line_naming_the_cache_path() {
    let fixture = hub_cache("missing");
    for id in ["org/absent", "org/ghost"] {
        let tried = fixture.0.join(format!(
            "hub/models--org--{}/snapshots",
            id.split_once('/').unwrap().1
        ));
        let offline = resolve(id, &settings(&fixture, None, true))
            .unwrap_err()
            .to_string();
        assert!(offline.contains(&tried.display().to_string()), "{offline}");
        assert!(offline.contains("HF_HUB_OFFLINE") && !offline.contains('\n'));
        let unreachable = resolve(id, &settings(&fixture, None, false)).unwrap_err();
        assert!(
            matches!(unreachable, HubError::Unreachable { .. }),
            "{unreachable}"
        );
        let text = unreachable.to_string();
        assert!(
            text.contains(&tried.display().to_string()) && !text.contains('\n'),
            "{text}"
        );
    }
}

#[test]
fn settings_read_the_environment_as_huggingface_hub_does() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let s = HubSettings::from_env(env(&[("HOME", "/home/u")]), None).unwrap();
    assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert!(!s.offline);
    let s = HubSettings::from_env(env(&[("HOME", "/h"), ("HF_HOME", "/hf")]), None).unwrap();
    assert_eq!(s.cache_dir, PathBuf::from("/hf/hub"));
    let s = HubSettings::from_env(
        env(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/cache"),
            ("HF_HUB_OFFLINE", "1"),
        ]),
        Some("v2".into()),
    )
    .unwrap();
    assert_eq!(
        (s.cache_dir.clone(), s.offline, s.revision()),
        (PathBuf::from("/cache"), true, "v2")
    );
    assert!(
        !HubSettings::from_env(env(&[("HF_HUB_OFFLINE", "0")]), None)
            .unwrap()
            .offline
    );
    assert_eq!(s.download_timeout, DEFAULT_DOWNLOAD_TIMEOUT);
    let timeout = |v: &'static str| {
        HubSettings::from_env(
            move |name: &str| (name == "HF_HUB_DOWNLOAD_TIMEOUT").then(|| v.to_string()),
            None,
        )
    };
    assert_eq!(
        timeout("2.5").unwrap().download_timeout,
        Duration::from_millis(2500)
    );
    for bad in ["0", "-1", "ten", "inf", "NaN"] {
        let err = timeout(bad).unwrap_err().to_string();
        assert!(
            err.contains("HF_HUB_DOWNLOAD_TIMEOUT") && err.contains(bad),
            "{err}"
        );
    }
}

#[test]
fn a_download_is_given_up_only_when_nothing_arrives_for_the_timeout() {
    let stall = Duration::from_millis(200);
    // Progress every 50 ms for ten times the timeout, then the answer: never given up.
    let (tx, rx) = mpsc::channel();
    let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = bytes.clone();
    std::thread::spawn(move || {
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            writer.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = tx.send(Ok(7));
    });
    let got = watch(&rx, stall, || {
        bytes.load(std::sync::atomic::Ordering::Relaxed)
    });
    assert_eq!(got.unwrap(), 7);
    // No progress and no answer: given up.
    let (_tx, rx) = mpsc::channel::<Result<u32, DownloadError>>();
    assert!(matches!(
        watch(&rx, stall, || 0),
        Err(DownloadError::Stalled)
    ));
}

#[test]
fn a_hub_that_accepts_but_never_answers_is_given_up_naming_the_timeout() {
    let fixture = hub_cache("stalled");
    // A listener that takes the connection and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let mut s = settings(&fixture, None, false);
    s.endpoint = Some(format!("http://127.0.0.1:{port}"));
    s.download_timeout = Duration::from_millis(300);
    let err = resolve("org/absent", &s).unwrap_err();
    assert!(matches!(err, HubError::Stalled { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("HF_HUB_DOWNLOAD_TIMEOUT") && text.contains("0.3 s"),
        "{text}"
    );
    assert!(
        text.contains("models--org--absent") && !text.contains('\n'),
        "{text}"
    );
}
