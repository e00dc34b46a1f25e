//! `candor fetch`: put a preset model into candor's cache and print its path.

use anyhow::Result;

use crate::cli::FetchArgs;
use crate::load::default_model;

/// Run `candor fetch`.
pub fn run(args: &FetchArgs) -> Result<()> {
    let preset = default_model::preset(&args.name)?;
    let path = default_model::fetch(preset)?;
    println!("{}", path.display());
    Ok(())
}
