//! Bakes the git commit into the binary (`HANGAR_GIT_HASH`: 8 hex digits, as Plane reports it), or
//! "unknown" when the source is not a git checkout or git is missing. `HANGAR_GIT_HASH` set in the
//! build environment wins (a container build without `.git` passes it in).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=HANGAR_GIT_HASH");
    let hash = match std::env::var("HANGAR_GIT_HASH") {
        Ok(hash) if !hash.is_empty() => hash,
        _ => git(&["rev-parse", "--short=8", "HEAD"]).unwrap_or_else(|| "unknown".into()),
    };
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the ref it points to (a commit).
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        // A packed ref has no file of its own (and a missing file would rerun this every build).
        let path = git(&["rev-parse", "--git-path", &reference])
            .filter(|p| std::path::Path::new(p).exists())
            .or_else(|| git(&["rev-parse", "--git-path", "packed-refs"]));
        if let Some(path) = path {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=HANGAR_GIT_HASH={hash}");
}
