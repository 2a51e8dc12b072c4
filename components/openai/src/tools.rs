//! Tool calling: the `tools` a chat offers, what `tool_choice` asks for, the grammar that makes
//! a required call well formed, and the calls read back from the model's text, in the
//! `<tool_call>{"name": …, "arguments": …}</tool_call>` format of Hermes- and Qwen-style chat
//! templates.

use crate::grammar;
use serde_json::{json, Value};

/// The longest function name OpenAI allows.
const MAX_NAME_CHARS: usize = 64;

/// What a request's `tool_choice` asks for.
#[derive(Clone, PartialEq, Eq)]
pub enum Choice {
    /// The model answers in text (the tools are still shown to it).
    None,
    /// The model decides; a call it writes is read back.
    Auto,
    /// The model must call one or more of the tools.
    Required,
    /// The model must call this one.
    Named(String),
}

/// The tools a chat offers and what it asks of them.
#[derive(Clone)]
pub struct Offer {
    /// The request's `tools`, as given to the chat template.
    pub tools: Vec<Value>,
    /// Each function's name and parameters schema.
    functions: Vec<(String, Value)>,
    pub choice: Choice,
    parallel: bool,
}

/// The offer of a request's `tools`, `tool_choice` and `parallel_tool_calls` (none without
/// tools), or the field that is wrong and why.
pub fn offer(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Offer>, (&'static str, String)> {
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tools)) => tools.clone(),
        Some(_) => return Err(("tools", "tools must be a list".into())),
    };
    let mut functions: Vec<(String, Value)> = Vec::new();
    for tool in &tools {
        if tool["type"] != "function" {
            return Err(("tools", "every tool must have type \"function\"".into()));
        }
        let name = tool["function"]["name"].as_str().unwrap_or_default();
        let valid = (1..=MAX_NAME_CHARS).contains(&name.chars().count())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err((
                "tools",
                format!("a function name must be 1 to {MAX_NAME_CHARS} of a-z, A-Z, 0-9, _ and -, not {name:?}"),
            ));
        }
        if functions.iter().any(|(known, _)| known == name) {
            return Err(("tools", format!("the function {name:?} is offered twice")));
        }
        let parameters = match &tool["function"]["parameters"] {
            Value::Null => json!({"type": "object"}),
            parameters => parameters.clone(),
        };
        functions.push((name.to_string(), parameters));
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err((
                    "tool_choice",
                    format!(
                        "tool_choice must be none, auto, required or a function, not {other:?}"
                    ),
                ))
            }
        },
        Some(named) => {
            let name = named["function"]["name"].as_str().unwrap_or_default();
            if named["type"] != "function" || !functions.iter().any(|(known, _)| known == name) {
                return Err((
                    "tool_choice",
                    format!(
                        "tool_choice names the function {name:?}, which `tools` does not offer"
                    ),
                ));
            }
            Choice::Named(name.to_string())
        }
    };
    if functions.is_empty() {
        return match choice {
            Choice::None | Choice::Auto => Ok(None),
            _ => Err((
                "tool_choice",
                "tool_choice asks for a call, but no tools are offered".into(),
            )),
        };
    }
    Ok(Some(Offer {
        tools,
        functions,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

impl Offer {
    /// The grammar that makes the answer the calls asked for, when a call is required.
    pub fn grammar(&self) -> Option<Result<String, String>> {
        if matches!(self.choice, Choice::None | Choice::Auto) {
            return None;
        }
        let functions: Vec<(&str, &Value)> = self
            .functions
            .iter()
            .filter(|(name, _)| match &self.choice {
                Choice::Named(named) => name == named,
                _ => true,
            })
            .map(|(name, parameters)| (name.as_str(), parameters))
            .collect();
        let parallel = self.parallel && self.choice == Choice::Required;
        Some(grammar::tool_calls(&functions, parallel))
    }

    /// The model's `text` read as an answer: its text outside calls (none if empty) and its
    /// calls, in OpenAI's shape with ids from `call_id`. Text whose calls do not all parse, or
    /// name tools not offered, is text; so is everything when `tool_choice` is `none`. A last
    /// call cut off by the token limit is dropped when whole calls came before it.
    pub fn read(
        &self,
        text: &str,
        mut call_id: impl FnMut() -> String,
    ) -> (Option<String>, Vec<Value>) {
        let as_text = || (Some(text.to_string()).filter(|t| !t.is_empty()), Vec::new());
        if self.choice == Choice::None {
            return as_text();
        }
        let (mut rest, mut calls, mut content) = (text, Vec::new(), String::new());
        while let Some(start) = rest.find("<tool_call>") {
            let Some(length) = rest[start..].find("</tool_call>") else {
                if calls.is_empty() {
                    return as_text();
                }
                rest = &rest[..start];
                break;
            };
            let call: Option<Value> = serde_json::from_str(&rest[start + 11..start + length]).ok();
            let Some(call) = call.and_then(|call| self.call(&call, call_id())) else {
                return as_text();
            };
            calls.push(call);
            content.push_str(&rest[..start]);
            rest = &rest[start + length + 12..];
        }
        if calls.is_empty() || (!self.parallel && calls.len() > 1) {
            return as_text();
        }
        content.push_str(rest);
        let content = content.trim();
        ((!content.is_empty()).then(|| content.to_string()), calls)
    }

    /// One call in OpenAI's shape, if it names an offered function with object arguments.
    fn call(&self, call: &Value, id: String) -> Option<Value> {
        let name = call["name"].as_str()?;
        self.functions.iter().find(|(known, _)| known == name)?;
        let arguments = match (&call["arguments"], &call["parameters"]) {
            (Value::Object(arguments), _) | (Value::Null, Value::Object(arguments)) => arguments,
            _ => return None,
        };
        Some(json!({
            "id": id,
            "type": "function",
            "function": { "name": name, "arguments": Value::Object(arguments.clone()).to_string() },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    }

    fn ids() -> impl FnMut() -> String {
        let mut next = 0;
        move || {
            next += 1;
            format!("call_{next}")
        }
    }

    #[test]
    fn calls_are_read_back_and_anything_else_is_text() {
        let offer = offer(Some(&weather()), None, None).unwrap().unwrap();
        let (content, calls) = offer.read(
            "Checking.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"wea",
            ids(),
        );
        assert_eq!(content.as_deref(), Some("Checking."));
        assert_eq!(
            calls,
            [
                json!({"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}})
            ]
        );
        for text in [
            "It rains.",
            "<tool_call>{\"name\": \"weather\", \"arguments\": {\"city\": ",
            "<tool_call>{\"name\": \"launch\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"weather\", \"arguments\": \"Paris\"}</tool_call>",
        ] {
            assert_eq!(
                offer.read(text, ids()),
                (Some(text.to_string()), Vec::new()),
                "{text}"
            );
        }
        let declined = super::offer(Some(&weather()), Some(&json!("none")), None)
            .unwrap()
            .unwrap();
        let call = "<tool_call>{\"name\": \"weather\", \"arguments\": {}}</tool_call>";
        assert!(declined.read(call, ids()).1.is_empty());
        assert!(declined.grammar().is_none());
    }

    #[test]
    fn what_tool_choice_asks_is_checked_against_the_tools() {
        let named = json!({"type": "function", "function": {"name": "weather"}});
        let offer = offer(Some(&weather()), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert!(offer.choice == Choice::Named("weather".into()));
        assert!(offer.grammar().unwrap().unwrap().contains("weather"));
        let unknown = json!({"type": "function", "function": {"name": "launch"}});
        assert_eq!(
            super::offer(Some(&weather()), Some(&unknown), None)
                .err()
                .unwrap()
                .0,
            "tool_choice"
        );
        assert_eq!(
            super::offer(None, Some(&json!("required")), None)
                .err()
                .unwrap()
                .0,
            "tool_choice"
        );
        assert!(super::offer(None, Some(&json!("auto")), None)
            .unwrap()
            .is_none());
        let bad_name = json!([{"type": "function", "function": {"name": "no spaces"}}]);
        assert_eq!(
            super::offer(Some(&bad_name), None, None).err().unwrap().0,
            "tools"
        );
        let twice = json!([weather()[0], weather()[0]]);
        assert_eq!(
            super::offer(Some(&twice), None, None).err().unwrap().0,
            "tools"
        );
    }
}
