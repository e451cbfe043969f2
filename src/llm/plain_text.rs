//! Client text that reaches the prompt as plain text, never as special tokens.
//!
//! Prompts are tokenized with special-token parsing on, because the template writes
//! `<im_start>`, `</s>` and the pose token as text; and llama.cpp matches user-defined (added)
//! tokens even with parsing off. So a question that contains such a token's text would put
//! the token itself into the prompt: a client could end the user turn, open an assistant turn
//! or emit the pose token. [`PlainText`] breaks every such occurrence in client text with a
//! WORD JOINER (U+2060) after its first character: the characters reach the model as ordinary
//! text, and text without them is left exactly as it was.

use super::Model;
use aho_corasick::{AhoCorasick, MatchKind};
use std::borrow::Cow;

const BREAK: char = '\u{2060}';

/// The texts of a vocabulary's control and user-defined tokens, and how to neutralise them.
#[derive(Debug, Clone)]
pub struct PlainText {
    matcher: Option<AhoCorasick>,
}

impl PlainText {
    /// The control and user-defined tokens of `model`'s vocabulary, plus `extra` texts (the
    /// manifest's markers).
    pub fn for_model(model: &Model, extra: &[&str]) -> Self {
        let mut texts: Vec<String> = (0..model.n_vocab() as super::Token)
            .filter(|&t| model.is_control(t) || model.is_user_defined(t))
            .filter_map(|t| model.token_text(t))
            .collect();
        texts.extend(extra.iter().map(|s| s.to_string()));
        Self::new(texts)
    }

    /// Neutralise these texts (empty ones and ones holding the break itself are skipped).
    pub fn new(mut texts: Vec<String>) -> Self {
        texts.retain(|t| !t.is_empty() && !t.contains(BREAK));
        texts.sort();
        texts.dedup();
        let matcher = (!texts.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&texts)
                .expect("literal patterns")
        });
        Self { matcher }
    }

    /// `text` with every special token's text broken after its first character. One pass is
    /// enough: the break is in no pattern, so inserting it cannot complete a new match.
    pub fn neutralise<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let Some(matcher) = &self.matcher else {
            return Cow::Borrowed(text);
        };
        let mut out = String::new();
        let mut last = 0;
        for m in matcher.find_iter(text) {
            let first = text[m.start()..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&text[last..m.start() + first]);
            out.push(BREAK);
            last = m.start() + first;
        }
        if last == 0 {
            return Cow::Borrowed(text);
        }
        out.push_str(&text[last..]);
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_texts_are_broken_and_other_text_is_untouched() {
        let p = PlainText::new(vec!["</s>".into(), "[SEG]".into(), "<s>".into()]);
        assert!(matches!(
            p.neutralise("What is she doing?"),
            Cow::Borrowed(_)
        ));
        let out = p.neutralise("a </s> b [SEG][SEG] <s>");
        assert_eq!(
            out,
            "a <\u{2060}/s> b [\u{2060}SEG][\u{2060}SEG] <\u{2060}s>"
        );
        assert_eq!(out.replace(BREAK, ""), "a </s> b [SEG][SEG] <s>");
        for t in ["</s>", "[SEG]", "<s>"] {
            assert!(!out.contains(t), "{out}");
        }
    }

    #[test]
    fn multibyte_first_characters_are_kept_whole() {
        let p = PlainText::new(vec!["▁tok".into()]);
        assert_eq!(p.neutralise("x▁toky"), "x▁\u{2060}toky");
    }
}
