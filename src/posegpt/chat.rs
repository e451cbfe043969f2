//! Chat: a question with or without an image (the live frame's embeddings included), multi-turn
//! conversations with a bounded history, and yes/no answers read from one prefill. The prompt
//! is split at the image marker and each text piece tokenized on its own.

use super::*;

impl PoseGpt {
    /// Chat about people: a question, optionally an image, optionally a conversation id whose
    /// earlier turns (at most `max_history_turns`) precede it.
    pub fn ask(
        &mut self,
        question: &str,
        image: Option<&RgbImage>,
        conversation: Option<&str>,
    ) -> Result<Reply, PoseGptError> {
        self.ask_about(question, image.map(AskImage::Rgb), conversation)
    }

    /// [`PoseGpt::ask`] with the image decoded, preprocessed elsewhere (the daemon preprocesses
    /// inline images and camera frames off the inference thread), or encoded already.
    pub fn ask_about(
        &mut self,
        question: &str,
        image: Option<AskImage<'_>>,
        conversation: Option<&str>,
    ) -> Result<Reply, PoseGptError> {
        let question = self.plain_question(question)?;
        let t0 = Instant::now();
        let seen = self.image_embeddings(image)?;
        let runs = self.prompt(&question, seen.embeddings.clone(), conversation)?;
        let segments: Vec<Segment<'_>> = runs.iter().map(Run::segment).collect();
        let m = &self.bundle.manifest;
        let params = GenerateParams {
            max_tokens: self.options.max_tokens,
            stop: m.prompt.stop.clone(),
            sampling: self.options.sampling.clone(),
            capture: vec![self.bundle.pose_token],
            capture_marker: Some(POSE_MARKER.to_string()),
        };
        let generation = self.session.generate(&segments, &params)?;
        let t2 = Instant::now();
        let mut poses = Vec::with_capacity(generation.captured.len());
        let mut head_network_ms = 0.0;
        for c in &generation.captured {
            let (pose, net_ms) = self.head_pose_timed(c.hidden.clone(), c.probability)?;
            poses.push(pose);
            head_network_ms += net_ms;
        }
        let text = generation.text.trim().to_string();
        if let Some(id) = conversation {
            let model_text = text.replace(POSE_MARKER, &self.bundle.manifest.prompt.pose_token);
            self.remember(id, question, seen.embeddings, model_text);
        }
        Ok(Reply {
            text,
            poses,
            stop_reason: generation.stop_reason,
            timings: Timings {
                preprocess_ms: seen.preprocess_ms,
                encode_ms: seen.encode_ms,
                prefill_ms: ms(generation.prefill_time),
                generate_ms: ms(generation.generate_time),
                head_ms: ms(t2.elapsed()),
                head_network_ms,
                total_ms: ms(t0.elapsed()) + seen.earlier_ms,
                prompt_positions: generation.prompt_positions,
                reused_positions: generation.reused_positions,
                generated_tokens: generation.tokens.len(),
            },
        })
    }

    /// A yes/no question without generation: the manifest's short-answer instruction follows
    /// the question, and P(yes) is the softmax over the answer tokens "Yes" and "No" of the
    /// logits at the last prompt position (one prefill, no sampling). In a conversation the
    /// turn is remembered with the answer "Yes" or "No".
    pub fn ask_yes_no(
        &mut self,
        question: &str,
        image: Option<AskImage<'_>>,
        conversation: Option<&str>,
    ) -> Result<YesNo, PoseGptError> {
        let (yes, no) = self.yes_no.ok_or(PoseGptError::NoYesNoTokens)?;
        let question = self.plain_question(question)?;
        let question = format!(
            "{question}\n{}",
            self.bundle.manifest.prompt.short_answer.trim()
        );
        let t0 = Instant::now();
        let seen = self.image_embeddings(image)?;
        let runs = self.prompt(&question, seen.embeddings.clone(), conversation)?;
        let segments: Vec<Segment<'_>> = runs.iter().map(Run::segment).collect();
        let t1 = Instant::now();
        let out = self.session.prefill(&segments, false)?;
        let p_yes = two_way_softmax(&out.logits, yes, no);
        let value = p_yes >= 0.5;
        if let Some(id) = conversation {
            let answer = if value { "Yes" } else { "No" };
            self.remember(id, question, seen.embeddings, answer.to_string());
        }
        Ok(YesNo {
            p_yes,
            value,
            timings: Timings {
                preprocess_ms: seen.preprocess_ms,
                encode_ms: seen.encode_ms,
                prefill_ms: ms(t1.elapsed()),
                total_ms: ms(t0.elapsed()) + seen.earlier_ms,
                prompt_positions: out.position + 1,
                reused_positions: self.session.last_reused_positions(),
                ..Timings::default()
            },
        })
    }

    /// The image's embeddings, computing what is not done yet.
    fn image_embeddings(&self, image: Option<AskImage<'_>>) -> Result<Seen, PoseGptError> {
        let t0 = Instant::now();
        let (pixels, preprocess_ms, earlier_ms) = match image {
            None => return Ok(Seen::default()),
            Some(AskImage::Encoded(e)) => {
                return Ok(Seen {
                    embeddings: Some(e.clone()),
                    ..Seen::default()
                })
            }
            Some(AskImage::Rgb(img)) => {
                let px = self.bundle.vision.preprocess(img);
                (std::borrow::Cow::Owned(px), ms(t0.elapsed()), 0.0)
            }
            Some(AskImage::Pixels {
                pixels,
                preprocess_ms,
            }) => (
                std::borrow::Cow::Borrowed(pixels),
                preprocess_ms,
                preprocess_ms,
            ),
        };
        let t1 = Instant::now();
        let embeddings = Arc::new(self.bundle.vision.encode_pixels(&pixels)?);
        Ok(Seen {
            embeddings: Some(embeddings),
            preprocess_ms,
            encode_ms: ms(t1.elapsed()),
            earlier_ms,
        })
    }

    /// The prompt of a question: system, the conversation's earlier turns, the question (with
    /// its image), and the opened assistant turn.
    fn prompt(
        &self,
        question: &str,
        image: Option<Arc<Vec<f32>>>,
        conversation: Option<&str>,
    ) -> Result<Vec<Run>, PoseGptError> {
        let history = conversation
            .and_then(|id| self.conversations.get(id))
            .map(|c| c.turns.as_slice())
            .unwrap_or_default();
        let m = &self.bundle.manifest;
        let mut text = m.system_text();
        let mut images = Vec::new();
        for turn in history {
            text.push_str(&m.user_turn(&turn.user, turn.image.is_some()));
            images.extend(turn.image.clone());
            text.push_str(&m.assistant_turn(&turn.assistant));
        }
        text.push_str(&m.user_turn(question, image.is_some()));
        images.extend(image);
        text.push_str(&m.assistant_open(""));
        self.prompt_runs(&text, &images)
    }

    /// A client's question as the prompt takes it: trimmed, and with the text of every special
    /// token (and the image marker) broken so that it stays plain text.
    fn plain_question(&self, question: &str) -> Result<String, PoseGptError> {
        let question = question.trim();
        if question.is_empty() {
            return Err(PoseGptError::EmptyQuestion);
        }
        Ok(self.plain.neutralise(question).into_owned())
    }

    /// The prompt tokens of a text-only question with no history, as [`PoseGpt::ask`] would
    /// decode them (for tests and debugging).
    pub fn ask_tokens(&self, question: &str) -> Result<Vec<Token>, PoseGptError> {
        let m = &self.bundle.manifest;
        let question = self.plain_question(question)?;
        let text = format!(
            "{}{}{}",
            m.system_text(),
            m.user_turn(&question, false),
            m.assistant_open("")
        );
        let mut tokens = Vec::new();
        for run in self.prompt_runs(&text, &[])? {
            if let Run::Tokens(t) = run {
                tokens.extend(t);
            }
        }
        Ok(tokens)
    }

    /// Turns kept for a conversation.
    pub fn history_len(&self, conversation: &str) -> usize {
        self.conversations
            .get(conversation)
            .map_or(0, |c| c.turns.len())
    }

    /// Forget a conversation.
    pub fn forget(&mut self, conversation: &str) {
        self.conversations.remove(conversation);
    }

    fn remember(
        &mut self,
        id: &str,
        user: String,
        image: Option<Arc<Vec<f32>>>,
        assistant: String,
    ) {
        let turn = Turn {
            user,
            image,
            assistant,
        };
        self.clock += 1;
        let clock = self.clock;
        let max_turns = self.options.max_history_turns;
        let conv = self.conversations.entry(id.to_string()).or_default();
        conv.turns.push(turn);
        if conv.turns.len() > max_turns {
            let excess = conv.turns.len() - max_turns;
            conv.turns.drain(..excess);
        }
        conv.last_used = clock;
        while self.conversations.len() > self.options.max_conversations.max(1) {
            let oldest = self
                .conversations
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    log::debug!("dropping conversation {k:?} (too many kept)");
                    self.conversations.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Split the prompt text at the image marker and tokenize each piece on its own, BOS on
    /// the first only (LLaVA's `tokenizer_image_token`); `images[i]` goes after piece i.
    pub(super) fn prompt_runs(
        &self,
        text: &str,
        images: &[Arc<Vec<f32>>],
    ) -> Result<Vec<Run>, PoseGptError> {
        let llm = &self.bundle.llm;
        let marker = self.bundle.manifest.prompt.image_marker.as_str();
        let mut runs = Vec::new();
        for (i, piece) in text.split(marker).enumerate() {
            if i > 0 {
                let image = images.get(i - 1).cloned().unwrap_or_default();
                runs.push(Run::Image(image));
            }
            let add_bos = i == 0 && llm.adds_bos();
            if !piece.is_empty() || add_bos {
                runs.push(Run::Tokens(llm.tokenize(piece, add_bos, true)?));
            }
        }
        Ok(runs)
    }
}

/// An ask's image as the prompt takes it, and what getting it took.
#[derive(Default)]
struct Seen {
    embeddings: Option<Arc<Vec<f32>>>,
    preprocess_ms: f64,
    encode_ms: f64,
    /// Preprocessing done before the call, counted in its total too.
    earlier_ms: f64,
}

/// P(a) between the two tokens `a` and `b` only.
fn two_way_softmax(logits: &[f32], a: Token, b: Token) -> f32 {
    let at = |t: Token| logits.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY) as f64;
    let (la, lb) = (at(a), at(b));
    let m = la.max(lb);
    let (ea, eb) = ((la - m).exp(), (lb - m).exp());
    (ea / (ea + eb)) as f32
}

pub(super) enum Run {
    Tokens(Vec<Token>),
    Image(Arc<Vec<f32>>),
}

impl Run {
    pub(super) fn segment(&self) -> Segment<'_> {
        match self {
            Run::Tokens(t) => Segment::Tokens(t),
            Run::Image(e) => Segment::Embeddings(e),
        }
    }
}
