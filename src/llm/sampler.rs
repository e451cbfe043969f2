//! Token sampling with llama.cpp's own samplers, applied to logits the session hands over
//! (so the logits and the hidden state that chose a token come from the same decode).

use super::model::Token;
use llama_cpp_sys_2 as sys;
use serde::{Deserialize, Serialize};
use std::ptr::NonNull;

/// How the next token is chosen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sampling {
    /// Always the most likely token: reproducible, what parity tests and pose answers use.
    #[default]
    Greedy,
    /// top-k, then top-p (nucleus), then temperature, then a seeded random draw.
    Random {
        temperature: f32,
        top_k: i32,
        top_p: f32,
        seed: u32,
    },
}

/// A llama.cpp sampler chain built from a [`Sampling`].
pub struct Sampler {
    chain: NonNull<sys::llama_sampler>,
}

// SAFETY: the sampler chain is owned exclusively by this value and only used through &mut self;
// llama.cpp samplers hold no thread-affine state.
unsafe impl Send for Sampler {}

impl Sampler {
    pub fn new(sampling: &Sampling) -> Self {
        // SAFETY: the default params are a plain struct; llama_sampler_chain_init returns an
        // owned chain (never null for valid params), freed in Drop. Each sampler added is
        // owned by the chain from then on.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let chain = NonNull::new(chain).expect("llama_sampler_chain_init returned null");
            let c = chain.as_ptr();
            match *sampling {
                Sampling::Greedy => {
                    sys::llama_sampler_chain_add(c, sys::llama_sampler_init_greedy())
                }
                Sampling::Random {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                } => {
                    if top_k > 0 {
                        sys::llama_sampler_chain_add(c, sys::llama_sampler_init_top_k(top_k));
                    }
                    if top_p < 1.0 {
                        sys::llama_sampler_chain_add(c, sys::llama_sampler_init_top_p(top_p, 1));
                    }
                    sys::llama_sampler_chain_add(c, sys::llama_sampler_init_temp(temperature));
                    sys::llama_sampler_chain_add(c, sys::llama_sampler_init_dist(seed));
                }
            }
            Self { chain }
        }
    }

    /// Choose a token from one position's logits and record it in the sampler's state.
    pub fn sample(&mut self, logits: &[f32]) -> Token {
        let mut candidates: Vec<sys::llama_token_data> = logits
            .iter()
            .enumerate()
            .map(|(id, &logit)| sys::llama_token_data {
                id: id as Token,
                logit,
                p: 0.0,
            })
            .collect();
        let mut array = sys::llama_token_data_array {
            data: candidates.as_mut_ptr(),
            size: candidates.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: array points to `candidates`, alive and exclusively borrowed for the call;
        // samplers may reorder or shrink the array (and move `data` within it) but never past
        // `size`. After the call `selected` indexes the (possibly updated) data pointer.
        let token = unsafe {
            sys::llama_sampler_apply(self.chain.as_ptr(), &mut array);
            let selected = usize::try_from(array.selected)
                .ok()
                .filter(|&i| i < array.size)
                .expect("llama.cpp sampler chain selected no token");
            (*array.data.add(selected)).id
        };
        // SAFETY: the chain is valid; accept only updates its internal state.
        unsafe { sys::llama_sampler_accept(self.chain.as_ptr(), token) };
        token
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the chain came from llama_sampler_chain_init and is freed once, here; it owns
        // and frees the samplers added to it.
        unsafe { sys::llama_sampler_free(self.chain.as_ptr()) }
    }
}
