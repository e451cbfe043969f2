//! A loaded GGUF model: weights, vocabulary, metadata, tokenization.

use super::logging;
use super::LlmError;
use llama_cpp_sys_2 as sys;
use std::ffi::{c_char, CStr, CString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// A token id of the model's vocabulary.
pub type Token = i32;

/// How a model is loaded.
#[derive(Debug, Clone)]
pub struct ModelParams {
    /// Layers offloaded to a GPU backend (CUDA builds); ignored on CPU-only builds. Negative: all.
    pub n_gpu_layers: i32,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self { n_gpu_layers: -1 }
    }
}

/// Whether this build of llama.cpp can offload layers to a GPU (a CUDA build that found a
/// device); false on CPU-only builds and where no GPU is present.
pub fn supports_gpu_offload() -> bool {
    logging::init_backend();
    // SAFETY: a query of llama.cpp's registered backends without arguments; the backends were
    // initialised by init_backend above.
    unsafe { sys::llama_supports_gpu_offload() }
}

/// A GGUF model loaded by llama.cpp. Immutable after loading; share it with `Arc`.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    path: PathBuf,
}

// SAFETY: a llama_model is never mutated after llama_model_load_from_file returns; llama.cpp
// documents sharing one model between contexts on different threads. All methods here take
// &self and only read the model or its vocabulary.
unsafe impl Send for Model {}
// SAFETY: see Send: concurrent reads of an immutable model are what llama.cpp supports.
unsafe impl Sync for Model {}

impl Model {
    /// Load a GGUF file. The file is checked to exist and to carry the GGUF magic first, so the
    /// common mistakes get a precise error instead of llama.cpp's generic failure.
    pub fn load(path: &Path, params: &ModelParams) -> Result<Self, LlmError> {
        check_gguf_magic(path)?;
        logging::init_backend();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            LlmError::LoadFailed {
                path: path.to_path_buf(),
                reason: "the path contains a NUL byte".into(),
            }
        })?;
        logging::clear_last_error();
        // SAFETY: llama_model_default_params returns a plain struct by value; no pointers in it
        // are owned by us.
        let mut mparams = unsafe { sys::llama_model_default_params() };
        mparams.n_gpu_layers = params.n_gpu_layers;
        // SAFETY: c_path is a valid NUL-terminated string for the duration of the call;
        // mparams was initialised by llama.cpp and only n_gpu_layers changed. A null return is
        // handled below.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mparams) };
        let ptr = NonNull::new(raw).ok_or_else(|| LlmError::LoadFailed {
            path: path.to_path_buf(),
            reason: logging::take_last_error()
                .unwrap_or_else(|| "no reason given (run with RUST_LOG=debug)".into()),
        })?;
        // SAFETY: ptr is a valid model; the vocabulary it returns lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let vocab = match NonNull::new(vocab as *mut sys::llama_vocab) {
            Some(v) => v,
            None => {
                // SAFETY: ptr came from llama_model_load_from_file and is freed exactly once.
                unsafe { sys::llama_model_free(ptr.as_ptr()) };
                return Err(LlmError::LoadFailed {
                    path: path.to_path_buf(),
                    reason: "the model has no vocabulary".into(),
                });
            }
        };
        Ok(Self {
            ptr,
            vocab,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    fn vocab_ptr(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Width of the hidden state (and of input embeddings).
    pub fn n_embd(&self) -> usize {
        // SAFETY: self.ptr is a valid model for the lifetime of self.
        unsafe { sys::llama_model_n_embd(self.as_ptr()) as usize }
    }

    /// Number of tokens in the vocabulary (= logits per position).
    pub fn n_vocab(&self) -> usize {
        // SAFETY: the vocabulary lives as long as the model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab_ptr()) as usize }
    }

    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: self.ptr is a valid model.
        unsafe { sys::llama_model_n_ctx_train(self.as_ptr()).max(0) as u32 }
    }

    /// Number of parameters.
    pub fn n_params(&self) -> u64 {
        // SAFETY: self.ptr is a valid model.
        unsafe { sys::llama_model_n_params(self.as_ptr()) }
    }

    /// Total size of the weights in bytes.
    pub fn size_bytes(&self) -> u64 {
        // SAFETY: self.ptr is a valid model.
        unsafe { sys::llama_model_size(self.as_ptr()) }
    }

    /// llama.cpp's one-line description, e.g. "llama 7B Q4_K - Medium".
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is writable for buf.len() bytes; llama.cpp writes at most that many,
        // NUL-terminated, and returns the length it wanted.
        let n = unsafe {
            sys::llama_model_desc(self.as_ptr(), buf.as_mut_ptr() as *mut c_char, buf.len())
        };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// A metadata value of the GGUF as a string (`general.architecture`, `general.name`, ...).
    pub fn meta(&self, key: &str) -> Option<String> {
        let c_key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 512];
        loop {
            // SAFETY: c_key is NUL-terminated; buf is writable for buf.len() bytes and
            // llama.cpp NUL-terminates within that length, returning the full length needed.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.as_ptr(),
                    c_key.as_ptr(),
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Token {
        // SAFETY: the vocabulary lives as long as the model.
        unsafe { sys::llama_vocab_bos(self.vocab_ptr()) }
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Token {
        // SAFETY: the vocabulary lives as long as the model.
        unsafe { sys::llama_vocab_eos(self.vocab_ptr()) }
    }

    /// Whether generation ends at this token (EOS, EOT and the like).
    pub fn is_end_of_generation(&self, token: Token) -> bool {
        // SAFETY: the vocabulary lives as long as the model; out-of-range ids are checked by
        // llama.cpp and answered false.
        self.in_vocab(token) && unsafe { sys::llama_vocab_is_eog(self.vocab_ptr(), token) }
    }

    /// Whether the tokenizer adds BOS at the start of a text.
    pub fn adds_bos(&self) -> bool {
        // SAFETY: the vocabulary lives as long as the model.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab_ptr()) }
    }

    fn in_vocab(&self, token: Token) -> bool {
        token >= 0 && (token as usize) < self.n_vocab()
    }

    /// The vocabulary's stored text for a token (SPM pieces keep their `▁`).
    pub fn token_text(&self, token: Token) -> Option<String> {
        if !self.in_vocab(token) {
            return None;
        }
        // SAFETY: token is in range; llama.cpp returns a pointer into the vocabulary, which
        // lives as long as the model, and it is copied at once.
        let p = unsafe { sys::llama_vocab_get_text(self.vocab_ptr(), token) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated string owned by the vocabulary.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// Whether the token is a control token (rendered only when asked, e.g. `</s>`).
    pub fn is_control(&self, token: Token) -> bool {
        self.token_attr(token) & sys::LLAMA_TOKEN_ATTR_CONTROL != 0
    }

    /// Whether the token is an added, user-defined token (e.g. a pose token).
    pub fn is_user_defined(&self, token: Token) -> bool {
        self.token_attr(token) & sys::LLAMA_TOKEN_ATTR_USER_DEFINED != 0
    }

    fn token_attr(&self, token: Token) -> sys::llama_token_attr {
        if !self.in_vocab(token) {
            return sys::LLAMA_TOKEN_ATTR_UNDEFINED;
        }
        // SAFETY: token is in range of the vocabulary, which lives as long as the model.
        unsafe { sys::llama_vocab_get_attr(self.vocab_ptr(), token) }
    }

    /// Tokenize text. `add_bos`: prepend BOS if the model's tokenizer does; `parse_special`:
    /// recognise special and control tokens written in the text (`<im_start>`, `</s>`).
    pub fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>, LlmError> {
        let len =
            i32::try_from(text.len()).map_err(|_| LlmError::TextTooLong { len: text.len() })?;
        let mut tokens: Vec<Token> = vec![0; text.len() + 2];
        loop {
            // SAFETY: text points to len valid bytes (need not be NUL-terminated);
            // tokens is writable for tokens.len() entries, which is what we pass as the max.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab_ptr(),
                    text.as_ptr() as *const c_char,
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_bos,
                    parse_special,
                )
            };
            if n == i32::MIN {
                return Err(LlmError::TextTooLong { len: text.len() });
            }
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            tokens.resize((-n) as usize, 0);
        }
    }

    /// The bytes a token stands for in generated text. `special`: render control tokens
    /// (otherwise they are empty). Bytes, not a string: one UTF-8 character may span tokens.
    pub fn token_bytes(&self, token: Token, special: bool) -> Vec<u8> {
        if !self.in_vocab(token) {
            return Vec::new();
        }
        let mut buf = vec![0u8; 32];
        loop {
            // SAFETY: token is in range; buf is writable for buf.len() bytes, which is passed
            // as the length; llama.cpp writes no terminator and returns the length used, or the
            // negated length needed.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab_ptr(),
                    token,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// Decode tokens to text (lossy for invalid UTF-8), control tokens left out.
    pub fn detokenize(&self, tokens: &[Token]) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| self.token_bytes(t, false))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The single token id that `text` is, if the vocabulary has it as one token
    /// (e.g. an added pose token). None when it tokenizes to zero or several tokens.
    pub fn single_token(&self, text: &str) -> Option<Token> {
        match self.tokenize(text, false, true).ok()?.as_slice() {
            [t] => Some(*t),
            _ => None,
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: ptr came from llama_model_load_from_file and is freed exactly once, here.
        // Sessions hold an Arc<Model>, so no context outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("path", &self.path).finish()
    }
}

pub(crate) fn check_gguf_magic(path: &Path) -> Result<(), LlmError> {
    if !path.is_file() {
        return Err(LlmError::FileNotFound {
            path: path.to_path_buf(),
        });
    }
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read(&mut magic));
    match read {
        Err(cause) => Err(LlmError::Unreadable {
            path: path.to_path_buf(),
            cause,
        }),
        Ok(4) if &magic == b"GGUF" => Ok(()),
        Ok(_) => Err(LlmError::NotGguf {
            path: path.to_path_buf(),
        }),
    }
}
