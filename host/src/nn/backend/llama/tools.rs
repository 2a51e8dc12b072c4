//! Chats with tools: the model's own chat template (the Jinja text in its GGUF metadata)
//! rendered with minijinja the way Hugging Face's transformers renders it — `messages`,
//! `tools`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`,
//! `strftime_now` (in UTC) and Python's string methods. llama.cpp's built-in templates know no tools;
//! this path runs only for a chat that passes `tools`, and only on a model whose template
//! uses them.

use super::BackendError;
use minijinja::{Environment, Error, ErrorKind, Value};

/// Template instructions one rendering may run: far more than any real template needs for
/// the messages a context window holds, and a bound on one that loops.
const RENDER_FUEL: u64 = 5_000_000;

/// The prompt for `messages` offered `tools`, by `template`; a template that never mentions
/// `tools` is refused, since the model would not know how to call them.
pub(super) fn render(
    template: &str,
    messages: &[serde_json::Value],
    tools: &[serde_json::Value],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, BackendError> {
    if !template.contains("tools") {
        return Err(BackendError::InvalidArgument(
            "this model's chat template does not support tools".into(),
        ));
    }
    let failed = |e: Error| BackendError::InvalidArgument(format!("the chat template: {e:#}"));
    let mut environment = Environment::new();
    environment.set_fuel(Some(RENDER_FUEL));
    environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    environment.add_function(
        "raise_exception",
        |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    environment.add_function("strftime_now", |format: String| {
        jiff::Timestamp::now().strftime(&format).to_string()
    });
    environment.add_template("chat", template).map_err(failed)?;
    let context = minijinja::context! {
        messages => Value::from_serialize(messages),
        tools => Value::from_serialize(tools),
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    environment
        .get_template("chat")
        .and_then(|chat| chat.render(context))
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::render;
    use serde_json::json;

    /// A ChatML template that lists tools and renders tool calls and results, as Qwen's and
    /// Hermes' do.
    const TOOLS_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\nTools:\n{%- for tool in tools %}\n{{ tool.function | tojson }}{%- endfor %}<|im_end|>\n{%- endif %}{%- for message in messages %}\n<|im_start|>{{ message.role }}\n{% if message.tool_calls %}{%- for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>{%- endfor %}{%- else %}{{ message.content.strip() }}{%- endif %}<|im_end|>{%- endfor %}{%- if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}";

    #[test]
    fn tools_calls_and_results_reach_the_prompt() {
        let tools = [
            json!({"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}),
        ];
        let messages = [
            json!({"role": "user", "content": "  Rain in Paris?  "}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "rain"}),
        ];
        let prompt = render(TOOLS_TEMPLATE, &messages, &tools, "<s>", "</s>").unwrap();
        assert!(
            prompt.starts_with("<|im_start|>system\nTools:\n{\"name\":\"weather\""),
            "{prompt}"
        );
        assert!(
            prompt.contains("<|im_start|>user\nRain in Paris?<|im_end|>"),
            "{prompt}"
        );
        assert!(prompt.contains("<tool_call>{\"arguments\":"), "{prompt}");
        assert!(
            prompt.contains("<|im_start|>tool\nrain<|im_end|>"),
            "{prompt}"
        );
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    }

    #[test]
    fn a_template_without_tools_or_that_fails_is_refused_by_reason() {
        let messages = [json!({"role": "user", "content": "hi"})];
        let plain = "{% for m in messages %}{{ m.content }}{% endfor %}";
        let refused = render(plain, &messages, &[], "", "").unwrap_err();
        assert!(
            refused.to_string().contains("does not support tools"),
            "{refused}"
        );
        let raising = "{% if tools %}{{ raise_exception('no tools for you') }}{% endif %}";
        let tools = [json!({"type": "function"})];
        let raised = render(raising, &messages, &tools, "", "").unwrap_err();
        assert!(raised.to_string().contains("no tools for you"), "{raised}");
        let looping = "{% if tools %}{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}{% endif %}";
        let spun = render(looping, &messages, &tools, "", "").unwrap_err();
        assert!(spun.to_string().contains("fuel"), "{spun}");
    }
}
