//! One llama.cpp context: a KV cache that remembers what it holds, prompt prefill with token
//! and embedding runs, and generation that can capture the hidden state behind chosen tokens.

use super::logging;
use super::model::{Model, Token};
use super::sampler::{Sampler, Sampling};
use super::LlmError;
use llama_cpp_sys_2 as sys;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a session's context is created.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionParams {
    /// Context length in positions; 0 takes the model's training length, capped at 4096.
    pub n_ctx: u32,
    /// Largest number of positions decoded in one llama.cpp call during prefill.
    pub n_batch: u32,
    /// Threads for single-token decodes (generation); 0 = all cores.
    pub n_threads: i32,
    /// Threads for batch decodes (prefill); 0 = all cores.
    pub n_threads_batch: i32,
    /// Exact mode: flash attention off and an F32 KV cache. llama.cpp then matches a float
    /// reference to ~1e-6 (parity tests); the default (flash attention auto, F16 KV) is faster
    /// and uses half the KV memory, at ~1e-3 difference.
    pub exact: bool,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self {
            n_ctx: 0,
            n_batch: 512,
            n_threads: 0,
            n_threads_batch: 0,
            exact: false,
        }
    }
}

/// A run of prompt positions: token ids, or raw input embeddings (`n_embd` floats per position,
/// row after row), as image features enter the LLM.
#[derive(Debug, Clone, Copy)]
pub enum Segment<'a> {
    Tokens(&'a [Token]),
    Embeddings(&'a [f32]),
}

/// What the last decoded position produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Logits over the vocabulary.
    pub logits: Vec<f32>,
    /// Final-norm hidden state, when it was asked for.
    pub hidden: Option<Vec<f32>>,
    /// The position (0-based) these outputs belong to.
    pub position: usize,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token (EOS/EOT).
    EndOfGeneration,
    /// One of the stop strings appeared in the text.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
}

/// Generation settings.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    pub sampling: Sampling,
    /// For each generated token in this set, the hidden state of the position whose logits
    /// chose it is returned (PoseGPT's pose token).
    pub capture: Vec<Token>,
    /// Text written into [`Generation::text`] in place of each captured token (e.g. a marker
    /// that clients can split on); None writes the token's own text.
    pub capture_marker: Option<String>,
}

/// A captured token: where it is in the generated tokens, the hidden state of the position
/// that chose it, and the probability the model gave it there.
#[derive(Debug, Clone)]
pub struct Captured {
    pub index: usize,
    pub token: Token,
    pub hidden: Vec<f32>,
    pub probability: f32,
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens, without the end-of-generation token.
    pub tokens: Vec<Token>,
    /// Their text (control tokens left out), cut before a stop string.
    pub text: String,
    pub stop_reason: StopReason,
    pub captured: Vec<Captured>,
    /// Positions in the prompt, and how many of them came from the KV cache.
    pub prompt_positions: usize,
    pub reused_positions: usize,
    pub prefill_time: Duration,
    pub generate_time: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheKey {
    Token(Token),
    Embedding(u64),
}

#[derive(Clone, Copy)]
enum Input<'a> {
    Token(Token),
    Embedding(&'a [f32]),
}

/// One llama.cpp context over a shared [`Model`].
pub struct Session {
    model: Arc<Model>,
    ctx: NonNull<sys::llama_context>,
    n_ctx: u32,
    n_batch: usize,
    /// What the KV cache holds, position by position (sequence 0).
    cache: Vec<CacheKey>,
    embeddings_on: bool,
    last_reused: usize,
    /// Set by another thread to stop a running decode (llama.cpp's abort callback reads it)
    /// and a generation between tokens.
    abort: Option<Arc<AtomicBool>>,
}

// SAFETY: the context is owned exclusively by this Session and used only through &mut self
// (or &self for read-only queries that llama.cpp does not mutate); llama.cpp contexts may be
// moved between threads as long as they are not used concurrently. Not Sync.
unsafe impl Send for Session {}

impl Session {
    pub fn new(model: Arc<Model>, params: &SessionParams) -> Result<Self, LlmError> {
        logging::init_backend();
        let all_cores = std::thread::available_parallelism()
            .map(|n| n.get() as i32)
            .unwrap_or(1);
        let threads = |n: i32| if n > 0 { n } else { all_cores };
        let n_ctx = if params.n_ctx > 0 {
            params.n_ctx
        } else {
            model.n_ctx_train().clamp(1, 4096)
        };
        let n_batch = params.n_batch.max(1);
        // SAFETY: returns a plain struct by value.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = n_ctx;
        cp.n_batch = n_batch;
        cp.n_ubatch = n_batch;
        cp.n_seq_max = 1;
        cp.n_threads = threads(params.n_threads);
        cp.n_threads_batch = threads(params.n_threads_batch);
        cp.embeddings = false;
        cp.no_perf = true;
        if params.exact {
            cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
            cp.type_k = sys::GGML_TYPE_F32;
            cp.type_v = sys::GGML_TYPE_F32;
        }
        logging::clear_last_error();
        // SAFETY: model.as_ptr() is a valid model kept alive by the Arc this Session holds for
        // as long as the context exists; cp was initialised by llama.cpp.
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), cp) };
        let ctx = NonNull::new(raw).ok_or_else(|| LlmError::ContextFailed {
            path: model.path().to_path_buf(),
            n_ctx,
            reason: logging::take_last_error().unwrap_or_else(|| "no reason given".into()),
        })?;
        // llama.cpp may clamp both (n_batch to n_ctx): chunk by what it actually took.
        // SAFETY: ctx is a valid context.
        let (n_ctx, n_batch) = unsafe {
            (
                sys::llama_n_ctx(ctx.as_ptr()),
                sys::llama_n_batch(ctx.as_ptr()).min(sys::llama_n_ubatch(ctx.as_ptr())),
            )
        };
        Ok(Self {
            model,
            ctx,
            n_ctx,
            n_batch: n_batch as usize,
            cache: Vec::new(),
            embeddings_on: false,
            last_reused: 0,
            abort: None,
        })
    }

    /// From now on, a decode stops soon after `flag` becomes true (llama.cpp checks it between
    /// the graph's operations), and so does a generation, between tokens: both then fail with
    /// [`LlmError::Aborted`]. What the KV cache held is forgotten.
    pub fn set_abort_flag(&mut self, flag: Arc<AtomicBool>) {
        let data = Arc::as_ptr(&flag) as *mut std::ffi::c_void;
        let callback: unsafe extern "C" fn(*mut std::ffi::c_void) -> bool = abort_requested;
        // SAFETY: ctx is valid. `data` points to the AtomicBool that `self.abort` keeps alive
        // for as long as the context exists (the field is dropped after `llama_free` in Drop,
        // and replacing it here first installs the new pointer); `abort_requested` only reads
        // it atomically, from whichever thread runs the graph.
        unsafe { sys::llama_set_abort_callback(self.ctx.as_ptr(), Some(callback), data) };
        self.abort = Some(flag);
    }

    fn aborted(&self) -> bool {
        self.abort
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Context length in positions.
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Positions the KV cache holds now.
    pub fn cached_positions(&self) -> usize {
        self.cache.len()
    }

    /// Positions of the last prefill that came from the KV cache instead of being computed.
    pub fn last_reused_positions(&self) -> usize {
        self.last_reused
    }

    /// Forget everything in the KV cache.
    pub fn clear(&mut self) {
        // SAFETY: ctx is valid; the memory handle it returns belongs to it.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
        self.cache.clear();
    }

    /// Evaluate a prompt and return the outputs of its last position (the hidden state too when
    /// `want_hidden`). Positions that match what the KV cache already holds, from the start,
    /// are not computed again.
    pub fn prefill(
        &mut self,
        prompt: &[Segment<'_>],
        want_hidden: bool,
    ) -> Result<StepOutput, LlmError> {
        let inputs = self.flatten(prompt)?;
        let total = inputs.len();
        if total == 0 {
            return Err(LlmError::EmptyPrompt);
        }
        if total > self.n_ctx as usize {
            return Err(LlmError::ContextFull {
                needed: total,
                n_ctx: self.n_ctx,
            });
        }
        let keys: Vec<CacheKey> = inputs.iter().map(|i| key_of(*i)).collect();
        // The last position is always decoded: its outputs are what the caller wants.
        let common = self
            .cache
            .iter()
            .zip(&keys)
            .take_while(|(a, b)| a == b)
            .count()
            .min(total - 1);
        self.truncate_cache(common);
        self.last_reused = common;
        log::debug!("prefill: {total} positions, {common} from the KV cache");

        // With embeddings on llama.cpp outputs every position of a batch, so the last position
        // goes alone when its hidden state is wanted (the rest needs no outputs at all).
        let (body_end, last_alone) = if want_hidden {
            (total - 1, true)
        } else {
            (total, false)
        };
        let mut start = common;
        while start < body_end {
            if self.aborted() {
                self.clear();
                return Err(LlmError::Aborted);
            }
            let kind = is_embedding(inputs[start]);
            let mut end = start + 1;
            while end < body_end && end - start < self.n_batch && is_embedding(inputs[end]) == kind
            {
                end += 1;
            }
            let output_last = !last_alone && end == total;
            self.decode(&inputs[start..end], start, output_last, false)?;
            self.cache.extend_from_slice(&keys[start..end]);
            start = end;
        }
        if last_alone {
            self.decode(&inputs[total - 1..], total - 1, true, true)?;
            self.cache.push(keys[total - 1]);
        }
        self.read_outputs(want_hidden, total - 1)
    }

    /// Append one token at the end of what the cache holds and return its outputs.
    pub fn push_token(&mut self, token: Token, want_hidden: bool) -> Result<StepOutput, LlmError> {
        self.check_token(token)?;
        let pos = self.cache.len();
        if pos + 1 > self.n_ctx as usize {
            return Err(LlmError::ContextFull {
                needed: pos + 1,
                n_ctx: self.n_ctx,
            });
        }
        self.decode(&[Input::Token(token)], pos, true, want_hidden)?;
        self.cache.push(CacheKey::Token(token));
        self.read_outputs(want_hidden, pos)
    }

    /// Prefill `prompt`, then generate until an end-of-generation token, a stop string,
    /// `max_tokens`, or a full context.
    pub fn generate(
        &mut self,
        prompt: &[Segment<'_>],
        params: &GenerateParams,
    ) -> Result<Generation, LlmError> {
        let capture = !params.capture.is_empty();
        let started = Instant::now();
        let mut out = self.prefill(prompt, capture)?;
        let prompt_positions = self.cache.len();
        let reused_positions = self.last_reused;
        let prefill_time = started.elapsed();
        let gen_started = Instant::now();

        let mut sampler = Sampler::new(&params.sampling);
        let mut tokens = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut captured = Vec::new();
        let stop_reason = loop {
            if tokens.len() >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            let token = sampler.sample(&out.logits);
            if self.model.is_end_of_generation(token) {
                break StopReason::EndOfGeneration;
            }
            if params.capture.contains(&token) {
                captured.push(Captured {
                    index: tokens.len(),
                    token,
                    hidden: out.hidden.clone().ok_or(LlmError::NoOutput {
                        what: "hidden state",
                    })?,
                    probability: softmax_at(&out.logits, token),
                });
            }
            tokens.push(token);
            match &params.capture_marker {
                Some(marker) if params.capture.contains(&token) => {
                    bytes.extend_from_slice(marker.as_bytes())
                }
                _ => bytes.extend(self.model.token_bytes(token, false)),
            }
            if let Some(cut) = find_stop(&bytes, &params.stop) {
                bytes.truncate(cut);
                break StopReason::StopString;
            }
            if tokens.len() >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.cache.len() + 1 > self.n_ctx as usize {
                break StopReason::ContextFull;
            }
            if self.aborted() {
                return Err(LlmError::Aborted);
            }
            out = self.push_token(token, capture)?;
        };
        Ok(Generation {
            tokens,
            text: String::from_utf8_lossy(&bytes).into_owned(),
            stop_reason,
            captured,
            prompt_positions,
            reused_positions,
            prefill_time,
            generate_time: gen_started.elapsed(),
        })
    }

    fn flatten<'a>(&self, prompt: &[Segment<'a>]) -> Result<Vec<Input<'a>>, LlmError> {
        let n_embd = self.model.n_embd();
        let mut inputs = Vec::new();
        for segment in prompt {
            match *segment {
                Segment::Tokens(tokens) => {
                    for &t in tokens {
                        self.check_token(t)?;
                        inputs.push(Input::Token(t));
                    }
                }
                Segment::Embeddings(data) => {
                    if data.len() % n_embd != 0 {
                        return Err(LlmError::EmbeddingWidth {
                            len: data.len(),
                            n_embd,
                        });
                    }
                    inputs.extend(data.chunks_exact(n_embd).map(Input::Embedding));
                }
            }
        }
        Ok(inputs)
    }

    fn check_token(&self, token: Token) -> Result<(), LlmError> {
        let n_vocab = self.model.n_vocab();
        if token < 0 || token as usize >= n_vocab {
            return Err(LlmError::TokenOutOfRange { token, n_vocab });
        }
        Ok(())
    }

    fn truncate_cache(&mut self, len: usize) {
        if len < self.cache.len() {
            // SAFETY: ctx is valid; removing positions [len, end) of sequence 0 from its own
            // memory is always allowed for a KV-cache model.
            unsafe {
                sys::llama_memory_seq_rm(
                    sys::llama_get_memory(self.ctx.as_ptr()),
                    0,
                    len as sys::llama_pos,
                    -1,
                );
            }
            self.cache.truncate(len);
        }
    }

    fn set_embeddings(&mut self, on: bool) {
        if self.embeddings_on != on {
            // SAFETY: ctx is valid; this toggles an output flag for following decodes.
            unsafe { sys::llama_set_embeddings(self.ctx.as_ptr(), on) };
            self.embeddings_on = on;
        }
    }

    /// Decode one homogeneous run (all tokens or all embeddings) at positions start.. .
    fn decode(
        &mut self,
        inputs: &[Input<'_>],
        start: usize,
        output_last: bool,
        embeddings: bool,
    ) -> Result<(), LlmError> {
        let n = inputs.len();
        let n_embd = self.model.n_embd();
        let embd_width = if is_embedding(inputs[0]) { n_embd } else { 0 };
        self.set_embeddings(embeddings);
        let batch = Batch::new(n, embd_width);
        // SAFETY: llama_batch_init allocated token (or embd, n * n_embd floats), pos, n_seq_id,
        // seq_id (each pointing at room for 1 id) and logits for n entries; every index written
        // below is < n, and every embedding row is exactly n_embd floats (checked in flatten).
        unsafe {
            let b = &batch.0;
            for (i, input) in inputs.iter().enumerate() {
                match *input {
                    Input::Token(t) => *b.token.add(i) = t,
                    Input::Embedding(row) => {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), b.embd.add(i * n_embd), n_embd)
                    }
                }
                *b.pos.add(i) = (start + i) as sys::llama_pos;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = 0;
                *b.logits.add(i) = (output_last && i == n - 1) as i8;
            }
        }
        let mut raw = batch.0;
        raw.n_tokens = n as i32;
        // SAFETY: ctx is valid and raw describes n fully initialised entries (above).
        let code = unsafe { sys::llama_decode(self.ctx.as_ptr(), raw) };
        drop(batch);
        if code != 0 {
            // A failed decode may leave part of the batch in the cache: start clean.
            self.clear();
            if code == 2 && self.aborted() {
                return Err(LlmError::Aborted);
            }
            return Err(LlmError::Decode {
                code,
                from: start,
                to: start + n,
                hint: match code {
                    1 => " (no room in the KV cache: raise n_ctx)",
                    2 => " (aborted)",
                    -1 => " (invalid batch)",
                    _ => "",
                },
            });
        }
        Ok(())
    }

    fn read_outputs(&self, want_hidden: bool, position: usize) -> Result<StepOutput, LlmError> {
        let n_vocab = self.model.n_vocab();
        // SAFETY: the last decode marked its last position as output; llama.cpp returns a
        // pointer to n_vocab floats for it (or null, handled), valid until the next decode; it
        // is copied at once.
        let logits = unsafe {
            let p = sys::llama_get_logits_ith(self.ctx.as_ptr(), -1);
            if p.is_null() {
                return Err(LlmError::NoOutput { what: "logits" });
            }
            std::slice::from_raw_parts(p, n_vocab).to_vec()
        };
        let hidden = if want_hidden {
            let n_embd = self.model.n_embd();
            // SAFETY: embeddings were on for the last decode, so llama.cpp holds n_embd floats
            // for its output position (or returns null, handled); copied at once.
            unsafe {
                let p = sys::llama_get_embeddings_ith(self.ctx.as_ptr(), -1);
                if p.is_null() {
                    return Err(LlmError::NoOutput {
                        what: "hidden state",
                    });
                }
                Some(std::slice::from_raw_parts(p, n_embd).to_vec())
            }
        } else {
            None
        };
        Ok(StepOutput {
            logits,
            hidden,
            position,
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: ctx came from llama_init_from_model and is freed exactly once, here, before
        // the Arc<Model> it depends on is released.
        unsafe { sys::llama_free(self.ctx.as_ptr()) }
    }
}

/// llama.cpp's abort callback: whether the session's abort flag is set.
extern "C" fn abort_requested(data: *mut std::ffi::c_void) -> bool {
    // SAFETY: `data` is the pointer set_abort_flag installed: an AtomicBool kept alive by the
    // session for as long as the context (and so this callback) exists.
    let flag = unsafe { &*(data as *const AtomicBool) };
    flag.load(Ordering::Relaxed)
}

/// An owned llama_batch, freed on drop.
struct Batch(sys::llama_batch);

impl Batch {
    fn new(n: usize, embd: usize) -> Self {
        // SAFETY: allocates arrays for n entries (embd floats each when embd > 0) and one
        // sequence id per entry; freed in Drop.
        Self(unsafe { sys::llama_batch_init(n as i32, embd as i32, 1) })
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: the batch came from llama_batch_init and is freed exactly once.
        unsafe { sys::llama_batch_free(self.0) }
    }
}

fn is_embedding(input: Input<'_>) -> bool {
    matches!(input, Input::Embedding(_))
}

fn key_of(input: Input<'_>) -> CacheKey {
    match input {
        Input::Token(t) => CacheKey::Token(t),
        Input::Embedding(row) => {
            let mut h = DefaultHasher::new();
            for v in row {
                v.to_bits().hash(&mut h);
            }
            CacheKey::Embedding(h.finish())
        }
    }
}

/// Softmax probability of one entry of a logits vector, computed stably.
pub fn softmax_at(logits: &[f32], index: Token) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Single-precision exponentials (every term is in (0, 1], so each is good to ~1e-7
    // relative), summed in double precision: a real vocabulary has 32k terms, and this runs
    // on every frame.
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    let at = logits
        .get(index as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    ((at - max).exp() as f64 / sum) as f32
}

/// Byte offset of the earliest stop string in `text`, if any occurs.
fn find_stop(text: &[u8], stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.windows(s.len()).position(|w| w == s.as_bytes()))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_at_the_earliest_match() {
        let stops = vec!["</s>".to_string(), "USER:".to_string()];
        assert_eq!(find_stop(b"hello USER: x </s>", &stops), Some(6));
        assert_eq!(find_stop(b"hello", &stops), None);
        assert_eq!(find_stop(b"a</s>", &stops), Some(1));
        assert_eq!(find_stop(b"abc", &[String::new()]), None);
    }

    #[test]
    fn softmax_probability_matches_the_definition() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (i, &l) in logits.iter().enumerate() {
            let expected = (l as f64).exp() / z;
            assert!((softmax_at(&logits, i as Token) as f64 - expected).abs() < 1e-6);
        }
    }
}
