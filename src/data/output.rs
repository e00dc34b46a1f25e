//! What commands write and report: JSON lines written whole, and rows skipped as bad.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::DataError;

/// Where JSON lines go: a file (written whole, then renamed into place) or stdout.
pub struct JsonLines {
    out: Box<dyn Write>,
    finish: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl JsonLines {
    /// Open `path`, or stdout when `None`.
    pub fn create(path: Option<&Path>) -> Result<Self> {
        Ok(match path {
            Some(p) => {
                let partial = p.with_extension("jsonl.partial");
                let f = std::fs::File::create(&partial)
                    .with_context(|| format!("cannot create `{}`", partial.display()))?;
                Self { out: Box::new(std::io::BufWriter::new(f)), finish: Some((partial, p.to_path_buf())) }
            }
            None => Self { out: Box::new(std::io::stdout().lock()), finish: None },
        })
    }

    /// Write one JSON value as a line.
    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    /// Flush, and move a file output into place.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        drop(self.out);
        if let Some((partial, dest)) = self.finish.take() {
            std::fs::rename(&partial, &dest).with_context(|| format!("cannot write `{}`", dest.display()))?;
        }
        Ok(())
    }
}

/// Report skipped rows on stderr.
pub fn report_skipped(skipped: &[DataError]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!("candor: skipped {} bad row(s):", skipped.len());
    for e in skipped.iter().take(10) {
        eprintln!("  {e}");
    }
    if skipped.len() > 10 {
        eprintln!("  ... and {} more", skipped.len() - 10);
    }
}
