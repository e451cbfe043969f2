//! The model converter (scripts/convert_chatpose.py) through its own tests
//! (scripts/test_convert.py): on the tiny released-layout checkpoint it writes the committed
//! models/test-chatpose-tiny byte for byte, with the checkpoint's name in llm.gguf; a missing
//! pose head, a tower that fails after llm.gguf was written, SIGTERM during llama.cpp's
//! converter and SIGKILL all leave no bundle at OUT and no temporary folders (the next run
//! clears what a killed one left); the staging folder's free-space check names the folder.
//!
//! They run with the converter's Python environment, which `scripts/setup.sh --tests` installs
//! into .venv-convert (or set POSEGPT_CONVERT_PYTHON to a Python that has
//! scripts/requirements-convert.txt).

mod common;

use common::root;
use std::path::PathBuf;
use std::process::Command;

fn converter_python() -> PathBuf {
    if let Some(p) = std::env::var_os("POSEGPT_CONVERT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = root().join(".venv-convert/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: the converter tests need the converter's Python environment; \
         run scripts/setup.sh --tests (or set POSEGPT_CONVERT_PYTHON)",
        venv.display()
    );
    venv
}

#[test]
fn the_converter_writes_a_whole_bundle_or_none() {
    let python = converter_python();
    let out = Command::new(&python)
        .args(["-m", "unittest", "-v", "test_convert"])
        .current_dir(root().join("scripts"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("{log}");
    assert!(out.status.success(), "scripts/test_convert.py failed");
    // unittest reports a class it could not run as skipped and still succeeds: here every test
    // must have run.
    assert!(!log.contains("skipped"), "converter tests were skipped");
    let ran = log
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .expect("unittest's summary line");
    assert!(ran >= 14, "only {ran} converter tests ran");
}
