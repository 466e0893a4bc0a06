//! Turns the policies' core wasm modules (built for `wasm32-unknown-unknown` with wit-bindgen,
//! which embeds the world in a custom section) into components, and prints what a component
//! imports and exports.
//!
//! ```text
//! componentize IN.wasm OUT.wasm [IN.wasm OUT.wasm ...]   # encode; OUT is rewritten only if it changed
//! componentize --imports FILE.wasm [FILE.wasm ...]        # validate, print imports and exports
//! ```
//!
//! The component imports exactly what the core module uses of its world (for the policies:
//! `vla:policy/host@0.1.0` and the types interface) and nothing else: a core module importing
//! anything outside its world (WASI, `env`, wasm-bindgen glue) fails to encode.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use wasmparser::{ComponentExternalKind, ComponentTypeRef, Payload};
use wit_component::ComponentEncoder;

const USAGE: &str = "usage: componentize IN.wasm OUT.wasm [IN.wasm OUT.wasm ...]\n       componentize --imports FILE.wasm [FILE.wasm ...]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("-h" | "--help") => {
            println!("{USAGE}");
            return if args.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
        Some("--imports") => args[1..].iter().try_for_each(|file| print_interface(Path::new(file))),
        Some(_) => encode_pairs(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("componentize: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn encode_pairs(args: &[String]) -> Result<()> {
    if !args.len().is_multiple_of(2) {
        bail!("expected pairs of IN.wasm OUT.wasm\n{USAGE}");
    }
    for pair in args.chunks(2) {
        let (input, output) = (Path::new(&pair[0]), Path::new(&pair[1]));
        let core = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
        let component = encode(&core).with_context(|| format!("componentizing {}", input.display()))?;
        if std::fs::read(output).is_ok_and(|old| old == component) {
            continue;
        }
        if let Some(dir) = output.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(output, &component).with_context(|| format!("writing {}", output.display()))?;
    }
    Ok(())
}

fn encode(core: &[u8]) -> Result<Vec<u8>> {
    ComponentEncoder::default().module(core)?.validate(true).encode()
}

/// Validates a component and prints its top-level imports and exports with their kinds, one per
/// line, as the component binary names them (what a host's linker has to satisfy).
fn print_interface(file: &Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    if !wasmparser::Parser::is_component(&bytes) {
        bail!("{} is not a component", file.display());
    }
    wasmparser::Validator::new().validate_all(&bytes).with_context(|| format!("validating {}", file.display()))?;
    println!("{} ({} bytes):", file.display(), bytes.len());
    // Nested modules and components are flattened into the payload stream; only depth 0 is the
    // component's own interface.
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(&bytes) {
        match payload? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(imports) if depth == 0 => {
                for import in imports {
                    let import = import?;
                    println!("  import {} ({})", import.name.name, kind(&import.ty));
                }
            }
            Payload::ComponentExportSection(exports) if depth == 0 => {
                for export in exports {
                    let export = export?;
                    println!("  export {} ({})", export.name.name, sort(export.kind));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn kind(ty: &ComponentTypeRef) -> &'static str {
    match ty {
        ComponentTypeRef::Module(_) => "module",
        ComponentTypeRef::Func(_) => "func",
        ComponentTypeRef::Value(_) => "value",
        ComponentTypeRef::Type(_) => "type",
        ComponentTypeRef::Instance(_) => "instance",
        ComponentTypeRef::Component(_) => "component",
    }
}

fn sort(kind: ComponentExternalKind) -> &'static str {
    match kind {
        ComponentExternalKind::Module => "module",
        ComponentExternalKind::Func => "func",
        ComponentExternalKind::Value => "value",
        ComponentExternalKind::Type => "type",
        ComponentExternalKind::Instance => "instance",
        ComponentExternalKind::Component => "component",
    }
}
