//! `vmdb cache list` and `vmdb cache prune`.

use std::path::Path;

use crate::cli::{CacheAction, CacheArgs};
use crate::distro::debcache;
use crate::engine::stepcache::Cache;
use crate::host::cachefile;

pub fn run(a: &CacheArgs) -> anyhow::Result<()> {
    let cache = Cache::open(&a.cache_dir)?;
    let debs = a.cache_dir.join("debs");
    match &a.action {
        CacheAction::List => {
            let entries = cache.list();
            let total: u64 = entries.iter().map(|m| m.size).sum();
            for m in &entries {
                println!(
                    "{}  {:>8}  {}  step {} ({})  {}",
                    &m.key[..16],
                    mb(m.size),
                    crate::engine::stepcache::age(m.created),
                    m.step,
                    m.kind,
                    m.spec
                );
            }
            let packages: u64 = debcache::debs_in(&debs)
                .iter()
                .filter_map(|n| std::fs::metadata(debs.join(n)).ok())
                .map(|m| m.len())
                .sum();
            println!(
                "{} saved image trees, {} in {}; package downloads {} in {}",
                entries.len(),
                mb(total),
                a.cache_dir.join("steps").display(),
                mb(packages),
                debs.display()
            );
            let mut left = cache.leftovers();
            left += cachefile::temporaries_usage(&debs);
            println!(
                "unfinished files: {}, {} (saves in progress, or left by interrupted ones: \
                 'vmdb cache prune' removes those)",
                left.files,
                mb(left.bytes)
            );
        }
        CacheAction::Prune {
            max_size,
            older_than,
            packages,
        } => {
            let pruned = cache.prune(*max_size, *older_than)?;
            let freed: u64 = pruned.entries.iter().map(|m| m.size).sum();
            println!(
                "removed {} saved image trees ({})",
                pruned.entries.len(),
                mb(freed)
            );
            let mut left = pruned.leftovers;
            left += cachefile::remove_orphans(&debs);
            println!(
                "removed files left by interrupted saves: {} ({})",
                left.files,
                mb(left.bytes)
            );
            if *packages && debs.is_dir() {
                let size = dir_size(&debs);
                std::fs::remove_dir_all(&debs)?;
                println!("removed the package downloads ({})", mb(size));
            }
        }
    }
    Ok(())
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
