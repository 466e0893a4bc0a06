//! The model repository: every `<repository>/<name>/model.toml` found at start is checked,
//! loaded onto its device, warmed up and given a [`Batcher`]. A model that fails is reported
//! (log and `/health`) and skipped; the others still serve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tch::Device;
use vla_api::{ModelHealth, ModelInfo};

use crate::batcher::Batcher;
use crate::config::Config;
use crate::demo;
use crate::metrics::{Metrics, ModelMetrics};
use crate::model::{device_name, resolve_device};
use crate::spec::ModelSpec;

/// A model that is serving.
#[derive(Debug)]
pub struct Model {
    pub spec: Arc<ModelSpec>,
    pub device: Device,
    pub batcher: Batcher,
    /// This model's metric handles, shared with its batcher.
    pub metrics: ModelMetrics,
    /// Its tokenizer (loaded with it).
    pub text: Arc<crate::text::TextEncoder>,
    /// When it finished loading (for the worker utilization gauge).
    pub loaded_at: std::time::Instant,
    /// Each robot's previous action, for the envelope's `max_delta`.
    pub last_actions: crate::envelope::Memory,
}

impl Model {
    pub fn info(&self) -> ModelInfo {
        let spec = &self.spec;
        ModelInfo {
            name: spec.name.clone(),
            version: spec.version.clone(),
            device: device_name(self.device),
            max_batch_size: spec.effective_max_batch(),
            batching: spec.batching.enabled,
            state_dim: spec.state_dim(),
            action_dof: spec.action.dof,
            action_horizon: spec.action.horizon,
            action_kind: spec.action.kind.as_str().into(),
            platform: spec.platform.as_str().into(),
            cameras: spec.cameras.iter().map(|c| c.name.clone()).collect(),
            tokenizer: spec.tokenizer_label(),
            dt_ms: spec.action.dt_ms,
            cpu_threads: self.batcher.cpu_threads().map(|c| vla_api::CpuThreads {
                threads: c.threads,
                chosen_by: if c.measured.is_some() { "measured" } else { "config" }.into(),
                largest_batch: c.measured.as_ref().map(|m| m.largest_batch),
                measured: c
                    .measured
                    .iter()
                    .flat_map(|m| &m.timings)
                    .map(|t| vla_api::ThreadTiming {
                        threads: t.threads,
                        batch_size: t.batch_size,
                        forward_ms: crate::clock::ms(t.forward),
                    })
                    .collect(),
            }),
            stats: self.batcher.stats(),
        }
    }
}

/// The repository's models: loaded at start, then loaded, reloaded and unloaded through the
/// OIP repository extension while serving.
#[derive(Debug)]
pub struct Models {
    root: PathBuf,
    cpu_threads: usize,
    /// Read on every request (cheap clones of `Arc`s), written only by loads and unloads.
    state: RwLock<State>,
    default: Option<String>,
    /// Serialises loads and unloads: two admins loading the same model must not race to swap.
    changing: Mutex<()>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct State {
    serving: BTreeMap<String, Arc<Model>>,
    /// Models found but not serving: name → the load error, or `None` when unloaded on request.
    unavailable: BTreeMap<String, Option<String>>,
}

/// One model of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<String>,
    pub ready: bool,
    pub reason: Option<String>,
}

/// Why a request's model could not be found among the serving ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("model `{0}` is not loaded")]
    NotFound(String),
    #[error("model `{model}` version `{version}` is not loaded (serving version `{serving}`)")]
    VersionNotFound { model: String, version: String, serving: String },
    #[error("several models are loaded and none is the default")]
    NoDefault,
}

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("model repository {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
}

impl Models {
    /// Scans and loads the repository (generating the demo model into an empty one when
    /// `models.demo` is on). Blocking: loads and warms up models.
    pub fn load(config: &Config, metrics: Arc<Metrics>) -> Result<Models, RepositoryError> {
        let root = config.model_repository();
        let io = |source| RepositoryError::Io { path: root.clone(), source };
        std::fs::create_dir_all(&root).map_err(io)?;
        let mut dirs = model_dirs(&root).map_err(io)?;
        if dirs.is_empty() && config.models.demo {
            tracing::info!(repository = %root.display(), "model repository is empty: generating the demo model `{}`", demo::NAME);
            demo::generate(&root)?;
            dirs = model_dirs(&root).map_err(io)?;
        }
        let mut state = State::default();
        for dir in dirs {
            let name = dir_name(&dir);
            match load_one(&dir, config.models.cpu_threads, &metrics) {
                Ok(model) => {
                    log_loaded(&model);
                    state.serving.insert(name, Arc::new(model));
                }
                Err(reason) => {
                    tracing::error!(model = %name, "model not loaded: {reason}");
                    state.unavailable.insert(name, Some(reason));
                }
            }
        }
        let default = match &config.models.default_model {
            Some(name) => Some(name.clone()),
            None if state.serving.len() == 1 => state.serving.keys().next().cloned(),
            None if state.serving.contains_key(demo::NAME) => Some(demo::NAME.into()),
            None => None,
        };
        if let Some(name) = &default
            && !state.serving.contains_key(name)
        {
            tracing::warn!("models.default_model `{name}` is not serving: requests that name no model get 404");
        }
        Ok(Models {
            root,
            cpu_threads: config.models.cpu_threads,
            state: RwLock::new(state),
            default,
            changing: Mutex::new(()),
            metrics,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Writers only swap map entries; a panic cannot leave the maps half-changed.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The model a request names, or the default one.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<Model>, ResolveError> {
        let name = match name {
            Some(name) => name,
            None => self.default.as_deref().ok_or(ResolveError::NoDefault)?,
        };
        self.read().serving.get(name).cloned().ok_or_else(|| ResolveError::NotFound(crate::names::clip(name, 80)))
    }

    /// The model `name` when serving `version` (any version when `None`).
    pub fn resolve_version(&self, name: &str, version: Option<&str>) -> Result<Arc<Model>, ResolveError> {
        let model = self.resolve(Some(name))?;
        match version {
            Some(v) if v != model.spec.version => Err(ResolveError::VersionNotFound {
                model: model.spec.name.clone(),
                version: crate::names::clip(v, 80),
                serving: model.spec.version.clone(),
            }),
            _ => Ok(model),
        }
    }

    pub fn is_serving(&self) -> bool {
        !self.read().serving.is_empty()
    }

    pub fn has_failures(&self) -> bool {
        self.read().unavailable.values().any(Option::is_some)
    }

    pub fn default_model(&self) -> Option<&str> {
        self.default.as_deref()
    }

    pub fn serving(&self) -> Vec<Arc<Model>> {
        self.read().serving.values().cloned().collect()
    }

    pub fn health(&self) -> Vec<ModelHealth> {
        let state = self.read();
        let serving = state.serving.values().map(|m| ModelHealth {
            name: m.spec.name.clone(),
            version: Some(m.spec.version.clone()),
            state: "serving".into(),
            device: Some(device_name(m.device)),
            error: None,
            envelope: Some(envelope_label(&m.spec)),
        });
        let failed = state.unavailable.iter().map(|(name, reason)| ModelHealth {
            name: name.clone(),
            version: None,
            state: if reason.is_some() { "failed" } else { "unloaded" }.into(),
            device: None,
            error: reason.clone(),
            envelope: None,
        });
        serving.chain(failed).collect()
    }

    /// Every model directory in the repository and whether it serves.
    pub fn index(&self) -> Result<Vec<IndexEntry>, RepositoryError> {
        let dirs = model_dirs(&self.root).map_err(|source| RepositoryError::Io { path: self.root.clone(), source })?;
        let state = self.read();
        let mut names: Vec<String> = dirs.iter().map(|d| dir_name(d)).collect();
        names.extend(state.serving.keys().cloned());
        names.sort();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|name| match state.serving.get(&name) {
                Some(m) => IndexEntry { version: Some(m.spec.version.clone()), ready: true, reason: None, name },
                None => IndexEntry {
                    version: None,
                    ready: false,
                    reason: Some(
                        state.unavailable.get(&name).cloned().flatten().unwrap_or_else(|| "not loaded".into()),
                    ),
                    name,
                },
            })
            .collect())
    }

    /// Loads (or reloads) `<repository>/<name>`: the new model is loaded and warmed up while
    /// the old one keeps serving, then swapped in; the old one finishes its queued requests
    /// and stops. A load that fails leaves the old one serving. Blocking.
    pub fn load_model(&self, name: &str) -> Result<Arc<Model>, String> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        if !crate::names::is_valid_name(name) {
            return Err(format!("`{}` is not a valid model name", crate::names::clip(name, 80)));
        }
        let dir = self.root.join(name);
        if !dir.join("model.toml").is_file() {
            return Err(format!("no {}", dir.join("model.toml").display()));
        }
        match load_one(&dir, self.cpu_threads, &self.metrics) {
            Ok(model) => {
                log_loaded(&model);
                let model = Arc::new(model);
                let old = {
                    let mut state = self.write();
                    state.unavailable.remove(name);
                    state.serving.insert(name.to_string(), model.clone())
                };
                if let Some(old) = old {
                    old.batcher.shutdown();
                }
                Ok(model)
            }
            Err(reason) => {
                let mut state = self.write();
                if state.serving.contains_key(name) {
                    tracing::error!(model = %name, "reload failed; the loaded version keeps serving: {reason}");
                } else {
                    tracing::error!(model = %name, "model not loaded: {reason}");
                    state.unavailable.insert(name.to_string(), Some(reason.clone()));
                }
                Err(reason)
            }
        }
    }

    /// Stops serving `name`: new requests get 404, queued ones are still answered. Blocking.
    pub fn unload_model(&self, name: &str) -> Result<(), ResolveError> {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let old = {
            let mut state = self.write();
            let old = state.serving.remove(name).ok_or_else(|| ResolveError::NotFound(crate::names::clip(name, 80)))?;
            state.unavailable.insert(name.to_string(), None);
            old
        };
        old.batcher.shutdown();
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    /// Stops every model's executors after they finish their queued work. Blocking; waits for
    /// a load in progress, so a model it swaps in is stopped too.
    pub fn shutdown(&self) {
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        for model in self.serving() {
            model.batcher.shutdown();
        }
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `deny`, `clamp`, or `none` (served without one).
fn envelope_label(spec: &ModelSpec) -> String {
    spec.action.envelope.as_ref().map_or("none", |e| e.on_violation.as_str()).to_string()
}

fn log_loaded(model: &Model) {
    let s = &model.spec;
    if s.action.envelope.is_none() {
        tracing::warn!(
            model = %s.name,
            "model has no [action.envelope]: its actions are bounded by the safety policies alone"
        );
    }
    tracing::info!(
        model = %s.name,
        version = %s.version,
        platform = s.platform.as_str(),
        device = %device_name(model.device),
        max_batch_size = s.effective_max_batch(),
        cameras = %s.cameras.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(","),
        tokenizer = %s.tokenizer_label(),
        horizon = s.action.horizon,
        dof = s.action.dof,
        envelope = %envelope_label(s),
        "model loaded and warmed up"
    );
}

/// Subdirectories holding a `model.toml`, sorted by name.
fn model_dirs(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path.join("model.toml").is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn load_one(dir: &Path, cpu_threads: usize, metrics: &Metrics) -> Result<Model, String> {
    let started = std::time::Instant::now();
    let spec = ModelSpec::load(dir).map_err(|e| e.to_string())?;
    let text = Arc::new(crate::text::TextEncoder::load(dir, &spec)?);
    let device = resolve_device(spec.device).map_err(|e| format!("{}: {e}", dir.join("model.toml").display()))?;
    let model_metrics = match device {
        Device::Cuda(_) => metrics.for_cuda_model(&spec.name),
        _ => metrics.for_model(&spec.name),
    };
    // Counts the copies of the version being loaded (a reload replaces the old one).
    model_metrics.memory.set(0);
    let batcher = Batcher::start(dir, &spec, device, cpu_threads, model_metrics.clone()).map_err(|e| e.to_string())?;
    metrics.model_load_duration.with_label_values(&[&spec.name]).observe(started.elapsed().as_secs_f64());
    let forget_after_ms = spec.action.envelope.as_ref().map_or(1, |e| e.forget_after_ms);
    Ok(Model {
        last_actions: crate::envelope::Memory::new(forget_after_ms),
        spec: Arc::new(spec),
        device,
        batcher,
        metrics: model_metrics,
        text,
        loaded_at: std::time::Instant::now(),
    })
}
