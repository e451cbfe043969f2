//! GGUF quantisation through llama.cpp's own quantiser (`llama_model_quantize`), so a device
//! needs no extra tools to shrink a converted model.

use super::logging;
use super::model::check_gguf_magic;
use super::LlmError;
use llama_cpp_sys_2 as sys;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Quantisation types offered (those that need no importance matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q6K,
    Q5KM,
    Q5KS,
    Q5_1,
    Q5_0,
    Q4KM,
    Q4KS,
    Q4_1,
    Q4_0,
    Q3KL,
    Q3KM,
    Q3KS,
    Q2K,
}

impl QuantType {
    pub const ALL: [QuantType; 17] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q8_0,
        Self::Q6K,
        Self::Q5KM,
        Self::Q5KS,
        Self::Q5_1,
        Self::Q5_0,
        Self::Q4KM,
        Self::Q4KS,
        Self::Q4_1,
        Self::Q4_0,
        Self::Q3KL,
        Self::Q3KM,
        Self::Q3KS,
        Self::Q2K,
    ];

    /// The name as llama.cpp's tools spell it, lower case.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q6K => "q6_k",
            Self::Q5KM => "q5_k_m",
            Self::Q5KS => "q5_k_s",
            Self::Q5_1 => "q5_1",
            Self::Q5_0 => "q5_0",
            Self::Q4KM => "q4_k_m",
            Self::Q4KS => "q4_k_s",
            Self::Q4_1 => "q4_1",
            Self::Q4_0 => "q4_0",
            Self::Q3KL => "q3_k_l",
            Self::Q3KM => "q3_k_m",
            Self::Q3KS => "q3_k_s",
            Self::Q2K => "q2_k",
        }
    }

    fn ftype(self) -> sys::llama_ftype {
        match self {
            Self::F32 => sys::LLAMA_FTYPE_ALL_F32,
            Self::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
            Self::Bf16 => sys::LLAMA_FTYPE_MOSTLY_BF16,
            Self::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
            Self::Q6K => sys::LLAMA_FTYPE_MOSTLY_Q6_K,
            Self::Q5KM => sys::LLAMA_FTYPE_MOSTLY_Q5_K_M,
            Self::Q5KS => sys::LLAMA_FTYPE_MOSTLY_Q5_K_S,
            Self::Q5_1 => sys::LLAMA_FTYPE_MOSTLY_Q5_1,
            Self::Q5_0 => sys::LLAMA_FTYPE_MOSTLY_Q5_0,
            Self::Q4KM => sys::LLAMA_FTYPE_MOSTLY_Q4_K_M,
            Self::Q4KS => sys::LLAMA_FTYPE_MOSTLY_Q4_K_S,
            Self::Q4_1 => sys::LLAMA_FTYPE_MOSTLY_Q4_1,
            Self::Q4_0 => sys::LLAMA_FTYPE_MOSTLY_Q4_0,
            Self::Q3KL => sys::LLAMA_FTYPE_MOSTLY_Q3_K_L,
            Self::Q3KM => sys::LLAMA_FTYPE_MOSTLY_Q3_K_M,
            Self::Q3KS => sys::LLAMA_FTYPE_MOSTLY_Q3_K_S,
            Self::Q2K => sys::LLAMA_FTYPE_MOSTLY_Q2_K,
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let want = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|t| t.name() == want)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown quantisation type {s:?}; one of: {}",
                    names.join(", ")
                )
            })
    }
}

/// What a quantisation did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub tensors: usize,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Input(#[from] LlmError),
    #[error("the output {path} is the input file; name another file")]
    SameFile { path: PathBuf },
    #[error("cannot write {path}: {cause}")]
    Output {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("llama.cpp could not quantise {input} to {qtype}: {reason}")]
    Failed {
        input: PathBuf,
        qtype: QuantType,
        reason: String,
    },
}

/// Quantise `input` into `output` as `qtype` with `threads` threads (0 = all cores).
/// `progress(done, total)` is called after each tensor. A failed run leaves no output file.
pub fn quantize(
    input: &Path,
    output: &Path,
    qtype: QuantType,
    threads: usize,
    mut progress: impl FnMut(usize, usize) + Send + 'static,
) -> Result<QuantizeReport, QuantizeError> {
    check_gguf_magic(input)?;
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(QuantizeError::SameFile {
            path: output.to_path_buf(),
        });
    }
    // Fail early on an unwritable output, with the OS's reason.
    std::fs::File::create(output).map_err(|cause| QuantizeError::Output {
        path: output.to_path_buf(),
        cause,
    })?;
    let c_string = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| QuantizeError::Failed {
            input: input.to_path_buf(),
            qtype,
            reason: format!("the path {} contains a NUL byte", p.display()),
        })
    };
    let (c_in, c_out) = (c_string(input)?, c_string(output)?);
    logging::init_backend();
    logging::clear_last_error();
    // SAFETY: returns a plain struct by value; its pointer fields are null (no imatrix, no
    // overrides) and stay so.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.ftype = qtype.ftype();
    params.nthread = threads as i32; // llama.cpp: <= 0 means all hardware threads
    let started = Instant::now();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    // llama.cpp logs one line per tensor: "[  12/ 201]  blk.0.attn_q.weight - ...".
    let observer = Box::new(move |line: &str| {
        if let Some((done, total)) = tensor_counter(line) {
            seen.store(done, std::sync::atomic::Ordering::Relaxed);
            progress(done, total);
        }
    });
    let rc = logging::observe_lines(observer, || {
        // SAFETY: c_in and c_out are valid NUL-terminated strings that outlive the call; params
        // was initialised by llama.cpp and only plain fields were changed. The call is
        // synchronous and keeps no pointers after it returns.
        unsafe { sys::llama_model_quantize(c_in.as_ptr(), c_out.as_ptr(), &params) }
    });
    let tensors = count.load(std::sync::atomic::Ordering::Relaxed);
    if rc != 0 {
        let _ = std::fs::remove_file(output);
        return Err(QuantizeError::Failed {
            input: input.to_path_buf(),
            qtype,
            reason: logging::take_last_error().unwrap_or_else(|| format!("return code {rc}")),
        });
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(QuantizeReport {
        input_bytes: size(input),
        output_bytes: size(output),
        tensors,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// "[  12/ 201] ..." → (12, 201).
fn tensor_counter(line: &str) -> Option<(usize, usize)> {
    let inner = line.strip_prefix('[')?.split(']').next()?;
    let (a, b) = inner.split_once('/')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_parse_and_unknown_ones_list_the_choices() {
        for t in QuantType::ALL {
            assert_eq!(t.name().parse::<QuantType>().unwrap(), t);
        }
        assert_eq!("Q4_K_M".parse::<QuantType>().unwrap(), QuantType::Q4KM);
        let e = "q4_k_x".parse::<QuantType>().unwrap_err();
        assert!(
            e.contains("q4_k_x") && e.contains("q4_k_m") && e.contains("q8_0"),
            "{e}"
        );
    }

    #[test]
    fn tensor_counter_reads_llama_cpp_progress_lines() {
        assert_eq!(
            tensor_counter("[  12/ 201]                blk.0.attn_q.weight - [64, 64]"),
            Some((12, 201))
        );
        assert_eq!(
            tensor_counter("llama_model_quantize_impl: model size"),
            None
        );
    }
}
