//! The model repository: every `<repository>/<name>/model.toml` found at start is checked,
//! loaded onto its device, warmed up and given a [`Batcher`]. A model that fails is reported
//! (log and `/health`) and skipped; the others still serve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::Device;
use vla_api::{ModelHealth, ModelInfo};

use crate::batcher::Batcher;
use crate::config::Config;
use crate::demo;
use crate::error::ApiError;
use crate::model::{device_name, resolve_device};
use crate::spec::ModelSpec;

/// A model that is serving.
#[derive(Debug)]
pub struct Model {
    pub spec: Arc<ModelSpec>,
    pub device: Device,
    pub batcher: Batcher,
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
            stats: self.batcher.stats(),
        }
    }
}

/// All models, loaded once at start.
#[derive(Debug, Default)]
pub struct Models {
    serving: BTreeMap<String, Arc<Model>>,
    /// Models found but not loaded: (name, reason).
    failed: Vec<(String, String)>,
    default: Option<String>,
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
    pub fn load(config: &Config) -> Result<Models, RepositoryError> {
        let root = config.model_repository();
        let io = |source| RepositoryError::Io { path: root.clone(), source };
        std::fs::create_dir_all(&root).map_err(io)?;
        let mut dirs = model_dirs(&root).map_err(io)?;
        if dirs.is_empty() && config.models.demo {
            tracing::info!(repository = %root.display(), "model repository is empty: generating the demo model `{}`", demo::NAME);
            demo::generate(&root)?;
            dirs = model_dirs(&root).map_err(io)?;
        }
        let mut models = Models::default();
        for dir in dirs {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match load_one(&dir, config.models.cpu_threads) {
                Ok(model) => {
                    tracing::info!(
                        model = %name,
                        version = %model.spec.version,
                        device = %device_name(model.device),
                        max_batch_size = model.spec.effective_max_batch(),
                        "model loaded and warmed up"
                    );
                    models.serving.insert(name, Arc::new(model));
                }
                Err(reason) => {
                    tracing::error!(model = %name, "model not loaded: {reason}");
                    models.failed.push((name, reason));
                }
            }
        }
        models.default = match &config.models.default_model {
            Some(name) => Some(name.clone()),
            None if models.serving.len() == 1 => models.serving.keys().next().cloned(),
            None if models.serving.contains_key(demo::NAME) => Some(demo::NAME.into()),
            None => None,
        };
        if let Some(name) = &models.default
            && !models.serving.contains_key(name)
        {
            tracing::warn!("models.default_model `{name}` is not serving: requests that name no model get 404");
        }
        Ok(models)
    }

    /// The model a request names, or the default one.
    pub fn resolve(&self, name: Option<&str>) -> Result<&Arc<Model>, ApiError> {
        let name = match name {
            Some(name) => name,
            None => self.default.as_deref().ok_or_else(|| ApiError::InvalidField {
                field: "model".into(),
                problem: "required: several models are loaded and none is the default".into(),
            })?,
        };
        self.serving.get(name).ok_or_else(|| ApiError::ModelNotFound(name.chars().take(80).collect()))
    }

    pub fn is_serving(&self) -> bool {
        !self.serving.is_empty()
    }

    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    pub fn default_model(&self) -> Option<&str> {
        self.default.as_deref()
    }

    pub fn serving(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.serving.values()
    }

    pub fn health(&self) -> Vec<ModelHealth> {
        let serving = self.serving.values().map(|m| ModelHealth {
            name: m.spec.name.clone(),
            version: Some(m.spec.version.clone()),
            state: "serving".into(),
            device: Some(device_name(m.device)),
            error: None,
        });
        let failed = self.failed.iter().map(|(name, reason)| ModelHealth {
            name: name.clone(),
            version: None,
            state: "failed".into(),
            device: None,
            error: Some(reason.clone()),
        });
        serving.chain(failed).collect()
    }

    /// Stops every model's executors after they finish their queued work. Blocking.
    pub fn shutdown(&self) {
        for model in self.serving.values() {
            model.batcher.shutdown();
        }
    }
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

fn load_one(dir: &Path, cpu_threads: usize) -> Result<Model, String> {
    let spec = ModelSpec::load(dir).map_err(|e| e.to_string())?;
    let device = resolve_device(spec.device).map_err(|e| format!("{}: {e}", dir.join("model.toml").display()))?;
    let batcher = Batcher::start(dir, &spec, device, cpu_threads).map_err(|e| e.to_string())?;
    Ok(Model { spec: Arc::new(spec), device, batcher })
}
