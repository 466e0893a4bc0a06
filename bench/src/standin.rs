//! `conv-vla`: a compute-bound stand-in beside the weight-bound demo model, generated like
//! `tiny-vla` (built with `tch::nn` from a fixed seed, traced to TorchScript), with the same
//! inputs and output, so the same requests, the same `model.toml` contract and the same Python
//! peers serve it.
//!
//! - image: a residual conv encoder of the ResNet family at 224×224: a stride-2 stem
//!   (3→32), a stride-2 conv (32→32, 56×56), then four stages of one basic block each (two 3×3
//!   convs and the skip) at 56, 28, 14 and 7 pixels with 32, 64, 128 and 256 channels, each
//!   stage after the first entered by a stride-2 conv; ReLU; global average pool → 256;
//! - instruction: byte-token embedding (256 × 32) flattened and projected → 128;
//! - state: linear → 64; head: 448 → 256 → 7 with `tanh`.
//!
//! About 0.31 GMAC per sample, nearly all in the convolutions, and ~2.3 M parameters (9 MB): the
//! forward is bound by arithmetic at every batch size, so a batch of 16 costs nearly 16
//! forwards of one on a CPU (batching saves little there; it does on a GPU). That is what
//! vision-heavy policies look like, where the demo model (a 36 MB head that a batch reads once)
//! flatters batching.

use std::path::{Path, PathBuf};

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

pub const NAME: &str = "conv-vla";
const SEED: i64 = 20_261_202;

struct Block {
    a: nn::Conv2D,
    b: nn::Conv2D,
}

impl Block {
    fn new(root: &nn::Path, c: i64) -> Block {
        let cfg = nn::ConvConfig { padding: 1, ..Default::default() };
        Block { a: nn::conv2d(root / "a", c, c, 3, cfg), b: nn::conv2d(root / "b", c, c, 3, cfg) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        (x + self.b.forward(&self.a.forward(x).relu()) * 0.5).relu()
    }
}

struct ConvVla {
    stem: Vec<nn::Conv2D>,
    stages: Vec<(Option<nn::Conv2D>, Block)>,
    embedding: nn::Embedding,
    text: nn::Linear,
    state: nn::Linear,
    hidden: nn::Linear,
    head: nn::Linear,
}

impl ConvVla {
    fn new(root: &nn::Path) -> ConvVla {
        let strided = |name: &str, i, o| {
            nn::conv2d(root / name, i, o, 3, nn::ConvConfig { stride: 2, padding: 1, ..Default::default() })
        };
        let widths = [32i64, 64, 128, 256];
        let stages = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let down = (i > 0).then(|| strided(&format!("down{i}"), widths[i - 1], c));
                (down, Block::new(&(root / format!("block{i}")), c))
            })
            .collect();
        ConvVla {
            stem: vec![strided("stem", 3, 32), strided("pool", 32, 32)],
            stages,
            embedding: nn::embedding(root / "tokens", 256, 32, Default::default()),
            text: nn::linear(root / "text", 32 * 32, 128, Default::default()),
            state: nn::linear(root / "state", 7, 64, Default::default()),
            hidden: nn::linear(root / "hidden", 256 + 128 + 64, 256, Default::default()),
            head: nn::linear(root / "head", 256, 7, Default::default()),
        }
    }

    fn forward(&self, image: &Tensor, instruction: &Tensor, state: &Tensor) -> Tensor {
        let mut x = image.shallow_clone();
        for conv in &self.stem {
            x = conv.forward(&x).relu();
        }
        for (down, block) in &self.stages {
            if let Some(down) = down {
                x = down.forward(&x).relu();
            }
            x = block.forward(&x);
        }
        let vision = x.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
        let text = self.text.forward(&self.embedding.forward(instruction).flatten(1, -1)).relu();
        let proprio = self.state.forward(state).relu();
        let h = self.hidden.forward(&Tensor::cat(&[vision, text, proprio], 1)).relu();
        (self.head.forward(&h) * 0.05).tanh()
    }
}

/// Writes `<parent>/conv-vla/{model.pt, model.toml}` (the demo's `model.toml` under this name)
/// unless it is already there, and returns the directory.
pub fn generate(parent: &Path) -> anyhow::Result<PathBuf> {
    let dir = parent.join(NAME);
    if dir.join("model.toml").exists() && dir.join("model.pt").exists() {
        return Ok(dir);
    }
    let module = appliance::demo::trace_demo_shaped("ConvVla", SEED, ConvVla::new, ConvVla::forward)?;
    let toml = appliance::demo::MODEL_TOML.replacen("name = \"tiny-vla\"", &format!("name = \"{NAME}\""), 1).replacen(
        "# tiny-vla: the demo model",
        "# conv-vla: the bench's compute-bound stand-in (bench/src/standin.rs), beside the demo model",
        1,
    );
    appliance::demo::write_model(&dir, &module, &toml)?;
    Ok(dir)
}
