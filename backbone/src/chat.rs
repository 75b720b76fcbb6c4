//! A model's chat template (the Jinja text Hugging Face tokenizers and GGUF files carry),
//! rendered with minijinja as transformers' `apply_chat_template` renders it.

use crate::error::{BackboneError, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A turn of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template with the special tokens it may refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// `bos_token` as the template sees it ("" when the model has none).
    pub bos_token: String,
    /// `eos_token` as the template sees it.
    pub eos_token: String,
    /// Where the template came from (a file and key), for errors.
    pub origin: String,
}

impl ChatTemplate {
    /// Renders `messages`, ending with the assistant's opening when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        // Python's string methods (`.strip()`, `.startswith()`) that templates written for
        // transformers call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let err = |e: Error| BackboneError::Tokenizer {
            path: self.origin.clone().into(),
            message: format!("chat template: {e}"),
        };
        env.add_template("chat", &self.source).map_err(err)?;
        env.get_template("chat")
            .map_err(err)?
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(err)
    }

    /// A prompt and its assistant reply as the template lays them out: the text up to the
    /// assistant's opening, and the rest of the conversation (the reply and its end-of-turn
    /// tokens), which is what an assistant-only loss trains on.
    pub fn prompt_and_reply(&self, user: &str, reply: &str) -> Result<(String, String)> {
        let turn = [Message::new("user", user)];
        let prompt = self.render(&turn, true)?;
        let full = self.render(&[turn[0].clone(), Message::new("assistant", reply)], false)?;
        match full.strip_prefix(&prompt) {
            Some(rest) => Ok((prompt, rest.to_string())),
            None => Err(BackboneError::Tokenizer {
                path: self.origin.clone().into(),
                message: "chat template: the conversation does not begin with the prompt rendered with add_generation_prompt, so the reply's tokens cannot be told apart".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its GGUF file carries it.
    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm() -> ChatTemplate {
        ChatTemplate {
            source: SMOLLM.into(),
            bos_token: "<|im_start|>".into(),
            eos_token: "<|im_end|>".into(),
            origin: "test".into(),
        }
    }

    #[test]
    fn chatml_renders_as_transformers_does() {
        let t = smollm();
        let (prompt, reply) = t.prompt_and_reply("Hi?", "Hello.").unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(reply, "Hello.<|im_end|>\n");
    }

    #[test]
    fn python_methods_and_raise_exception_work_and_errors_name_the_origin() {
        let t = ChatTemplate {
            source: "{{ messages[0]['content'].strip() }}{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
            origin: "model.gguf: tokenizer.chat_template".into(),
        };
        assert_eq!(
            t.render(&[Message::new("user", "  x  ")], false).unwrap(),
            "x"
        );
        let two = [Message::new("user", "a"), Message::new("assistant", "b")];
        let e = t.render(&two, false).unwrap_err().to_string();
        assert!(
            e.contains("one turn only") && e.contains("tokenizer.chat_template"),
            "{e}"
        );
        let broken = ChatTemplate {
            source: "{% for m in messages %}".into(),
            ..t
        };
        assert!(broken.render(&[], false).is_err());
    }
}
