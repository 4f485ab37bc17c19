//! Models by Hugging Face id (`org/name`), offline first, in the Hugging Face cache layout.
//!
//! A spec that is not an existing path and reads `org/name` is a hub id. [`HubSettings`] says
//! where the cache is (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`,
//! as `huggingface_hub` resolves it), which revision (`--revision`: a branch or tag read
//! through `refs/<revision>`, or a commit hash naming `snapshots/<hash>`; default `main`),
//! and whether the network may be used (`HF_HUB_OFFLINE`). [`resolve`] returns the snapshot
//! directory of `models--org--name` when its files are there (symlinks into `blobs/`, which the
//! loader follows); otherwise, online, it downloads them with the `hf-hub` crate (progress bars
//! on the terminal) into the same layout. Offline, or when the hub cannot be reached, a
//! missing model is a one-line error naming the cache path that was tried. `hf-hub` sets no
//! read timeout, so the download runs on its own thread and is given up when nothing has
//! arrived for `HF_HUB_DOWNLOAD_TIMEOUT` seconds (default 10, as `huggingface_hub`): no answer
//! to a request, and no byte added to the repository's `blobs/`. The partial file stays there
//! and the next run resumes it.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hf_hub::{Repo, RepoType};
use thiserror::Error;

/// The files a model directory needs besides its `*.safetensors` weights.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files fetched when the repository has them.
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// Where models are looked up and whether they may be downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The hub cache (`…/hub`, holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// `--revision` (default `main`).
    pub revision: Option<String>,
    /// `HF_HUB_OFFLINE`: never use the network.
    pub offline: bool,
    /// `HF_ENDPOINT` (default `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// `HF_TOKEN`, for gated repositories.
    pub token: Option<String>,
    /// `HF_HUB_DOWNLOAD_TIMEOUT`: a download with nothing arriving for this long is given up.
    pub download_timeout: Duration,
}

/// `huggingface_hub`'s default `HF_HUB_DOWNLOAD_TIMEOUT`.
pub const DEFAULT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(10);

impl HubSettings {
    /// The settings `huggingface_hub` would use, from the environment as `env` reads it; a
    /// `HF_HUB_DOWNLOAD_TIMEOUT` that is not a positive number of seconds is an error.
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        revision: Option<String>,
    ) -> Result<Self, HubError> {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let cache_dir = set("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| set("HF_HOME").map(|home| PathBuf::from(home).join("hub")))
            .unwrap_or_else(|| {
                set("HOME")
                    .map_or_else(PathBuf::new, PathBuf::from)
                    .join(".cache/huggingface/hub")
            });
        let offline = set("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let download_timeout = match set("HF_HUB_DOWNLOAD_TIMEOUT") {
            None => DEFAULT_DOWNLOAD_TIMEOUT,
            Some(value) => value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
                .map(Duration::from_secs_f64)
                .ok_or(HubError::InvalidSetting {
                    name: "HF_HUB_DOWNLOAD_TIMEOUT",
                    value,
                })?,
        };
        Ok(Self {
            cache_dir,
            revision,
            offline,
            endpoint: set("HF_ENDPOINT"),
            token: set("HF_TOKEN"),
            download_timeout,
        })
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// Why a hub model could not be found or fetched.
#[derive(Debug, Error)]
pub enum HubError {
    #[error(
        "`{id}` (revision {revision}) is not in the Hugging Face cache at {tried} and HF_HUB_OFFLINE is set"
    )]
    NotCachedOffline {
        id: String,
        revision: String,
        tried: PathBuf,
    },
    #[error(
        "`{id}` (revision {revision}) is not in the Hugging Face cache at {tried}, and the hub cannot be reached: {reason}"
    )]
    Unreachable {
        id: String,
        revision: String,
        tried: PathBuf,
        reason: String,
    },
    #[error(
        "`{id}` (revision {revision}): nothing arrived from the Hugging Face hub for {seconds} s (HF_HUB_DOWNLOAD_TIMEOUT); what was fetched stays in {tried} and the next run resumes it"
    )]
    Stalled {
        id: String,
        revision: String,
        tried: PathBuf,
        seconds: f64,
    },
    #[error("`{id}`: the repository has no {what}")]
    NotAModel { id: String, what: String },
    #[error("{name}={value:?}: expected a number of seconds greater than 0")]
    InvalidSetting { name: &'static str, value: String },
}

/// Whether `spec` names a hub model (`org/name`) rather than a directory.
pub fn is_hub_id(spec: &str) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match spec.split_once('/') {
        Some((org, name)) => valid(org) && valid(name) && !Path::new(spec).exists(),
        None => false,
    }
}

/// The snapshot directory of model `id` at the settings' revision: from the cache, or
/// downloaded into it when allowed.
pub fn resolve(id: &str, settings: &HubSettings) -> Result<PathBuf, HubError> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, settings.revision().into());
    let repo_dir = settings.cache_dir.join(repo.folder_name());
    if let Some(dir) = cached_snapshot(&repo_dir, settings.revision()) {
        tracing::info!(model = id, snapshot = %dir.display(), "model found in the Hugging Face cache");
        return Ok(dir);
    }
    let tried = repo_dir.join("snapshots");
    if settings.offline {
        return Err(HubError::NotCachedOffline {
            id: id.to_string(),
            revision: settings.revision().to_string(),
            tried,
        });
    }
    download_watched(id, repo, settings).map_err(|reason| match reason {
        DownloadError::Network(reason) => HubError::Unreachable {
            id: id.to_string(),
            revision: settings.revision().to_string(),
            tried,
            reason,
        },
        DownloadError::Stalled => HubError::Stalled {
            id: id.to_string(),
            revision: settings.revision().to_string(),
            seconds: settings.download_timeout.as_secs_f64(),
            tried: repo_dir,
        },
        DownloadError::NotAModel(what) => HubError::NotAModel {
            id: id.to_string(),
            what,
        },
    })
}

/// `snapshots/<commit>` when the revision resolves (a ref file, or a commit hash) and the
/// snapshot holds a complete model.
fn cached_snapshot(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(commit) => commit.trim().to_string(),
        Err(_) if is_commit_hash(revision) => revision.to_string(),
        Err(_) => return None,
    };
    let dir = repo_dir.join("snapshots").join(commit);
    is_complete(&dir).then_some(dir)
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The required files and at least one `*.safetensors` (a dangling symlink counts as missing).
fn is_complete(dir: &Path) -> bool {
    let weights = std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let path = e.path();
            path.extension().is_some_and(|x| x == "safetensors") && path.is_file()
        })
    });
    weights && REQUIRED.iter().all(|f| dir.join(f).is_file())
}

#[derive(Debug)]
enum DownloadError {
    Network(String),
    NotAModel(String),
    /// Nothing arrived for the download timeout.
    Stalled,
}

/// [`download`] on its own thread, given up when it has neither finished nor added a byte to
/// the repository's `blobs/` for `settings.download_timeout` (the thread, blocked in a read
/// that has no timeout, is left behind; its lock on the partial file goes with the process).
fn download_watched(
    id: &str,
    repo: Repo,
    settings: &HubSettings,
) -> Result<PathBuf, DownloadError> {
    let blobs = settings.cache_dir.join(repo.folder_name()).join("blobs");
    let (tx, rx) = mpsc::channel();
    let (id_owned, settings_owned) = (id.to_string(), settings.clone());
    std::thread::Builder::new()
        .name("stepscope-hub-download".into())
        .spawn(move || {
            let _ = tx.send(download(&id_owned, repo, &settings_owned));
        })
        .map_err(|e| DownloadError::Network(format!("cannot start the download thread: {e}")))?;
    watch(&rx, settings.download_timeout, || bytes_under(&blobs))
}

/// Waits for the answer on `rx` while `progress()` keeps changing; [`DownloadError::Stalled`]
/// once it has not changed for `stall`.
fn watch<T>(
    rx: &mpsc::Receiver<Result<T, DownloadError>>,
    stall: Duration,
    progress: impl Fn() -> u64,
) -> Result<T, DownloadError> {
    let poll = (stall / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut seen = progress();
    let mut since = Instant::now();
    loop {
        match rx.recv_timeout(poll) {
            Ok(answer) => return answer,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(DownloadError::Network("the download thread stopped".into()));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = progress();
                if now != seen {
                    (seen, since) = (now, Instant::now());
                } else if since.elapsed() >= stall {
                    return Err(DownloadError::Stalled);
                }
            }
        }
    }
}

/// The bytes of the files in `dir` (finished blobs and `.part` files); 0 when it is missing.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// Fetches the model's files through the hub API into the cache (progress bars on stderr).
fn download(id: &str, repo: Repo, settings: &HubSettings) -> Result<PathBuf, DownloadError> {
    let network = |e: hf_hub::api::sync::ApiError| DownloadError::Network(e.to_string());
    let mut builder = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(settings.cache_dir.clone())
        .with_token(settings.token.clone())
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build().map_err(network)?.repo(repo);
    let info = api.info().map_err(network)?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let weights: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .collect();
    if weights.is_empty() {
        return Err(DownloadError::NotAModel("*.safetensors weights".into()));
    }
    for required in REQUIRED {
        if !files.contains(&required) {
            return Err(DownloadError::NotAModel(required.into()));
        }
    }
    tracing::info!(
        model = id,
        files = weights.len() + REQUIRED.len(),
        "downloading from the Hugging Face hub"
    );
    let mut snapshot = None;
    let wanted = REQUIRED
        .iter()
        .chain(OPTIONAL.iter().filter(|f| files.contains(f)))
        .copied()
        .chain(weights.iter().copied());
    for file in wanted {
        let path = api.get(file).map_err(network)?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| DownloadError::NotAModel("files".into()))
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
