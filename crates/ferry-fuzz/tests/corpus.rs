//! Replays every checked-in fuzz input on stable: `fuzz/corpus/<target>/*`
//! (seeds, inputs libFuzzer kept, and `regression-*` inputs that once
//! crashed) and `fuzz/artifacts/<target>/*` (crashing inputs kept on
//! purpose), each through its target's function in `ferry_fuzz`.

use std::path::{Path, PathBuf};

/// Kept crashing inputs whose bug lives outside ferry-protocol and
/// ferry-core and is not fixed yet: (target, file name, why). The replay
/// skips them; remove an entry once its bug is fixed.
const KNOWN_CRASHES: &[(&str, &str, &str)] = &[];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir/<target>/`, by target.
fn inputs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(targets) = std::fs::read_dir(dir) else {
        return out;
    };
    for target in targets.flatten() {
        let target_dir = target.path();
        if !target_dir.is_dir() {
            continue;
        }
        let name = target.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(&target_dir)
            .expect("list a corpus directory")
            .flatten()
        {
            let path = file.path();
            if path.is_file() {
                out.push((name.clone(), path));
            }
        }
    }
    out.sort();
    out
}

fn replay(dir: &Path) -> usize {
    let mut ran = 0;
    for (target, path) in inputs(dir) {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if KNOWN_CRASHES.iter().any(|(t, f, _)| *t == target && *f == file) {
            eprintln!("skipping known crash {target}/{file}");
            continue;
        }
        let f = ferry_fuzz::target(&target)
            .unwrap_or_else(|| panic!("{} is not the directory of a fuzz target", path.display()));
        let data = std::fs::read(&path).expect("read a corpus file");
        eprintln!("{target}/{file} ({} bytes)", data.len());
        f(&data);
        ran += 1;
    }
    ran
}

#[test]
fn corpora_replay() {
    let ran = replay(&fuzz_dir().join("corpus"));
    assert!(ran > 0, "no corpus found under {}", fuzz_dir().join("corpus").display());
}

#[test]
fn kept_artifacts_replay() {
    replay(&fuzz_dir().join("artifacts"));
}

#[test]
fn every_target_has_a_fuzz_target_file_and_a_corpus() {
    for (name, _) in ferry_fuzz::TARGETS {
        let file = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(file.exists(), "{} is missing", file.display());
        let corpus = fuzz_dir().join("corpus").join(name);
        assert!(corpus.is_dir(), "{} is missing", corpus.display());
    }
}

#[test]
fn known_crashes_exist() {
    for (target, file, why) in KNOWN_CRASHES {
        let path = fuzz_dir().join("artifacts").join(target).join(file);
        assert!(path.exists(), "known crash {} ({why}) is missing", path.display());
    }
}
