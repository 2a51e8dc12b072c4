//! Structured output: llama.cpp (GBNF) grammars that let a model write nothing but JSON of the
//! shape asked for — any JSON object (`response_format` `json_object`), or a value of a JSON
//! schema (`json_schema`). A schema is turned into a grammar whose every text validates
//! against it: an object writes each of its properties, in the order of their names (so every
//! required one is there, and nothing else). Keywords the grammar cannot enforce
//! (`pattern`, `minimum`, `$ref`, …) are refused by name rather than ignored.

use serde_json::{Map, Value};

/// The rules every grammar shares: JSON values, with whitespace kept short so that the model
/// cannot spend its tokens on it.
const JSON_RULES: &str = r#"
value   ::= object | array | string | number | ("true" | "false" | "null") ws
object  ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array   ::= "[" ws ( value ("," ws value)* )? "]" ws
string  ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number  ::= digits ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? ws
integer ::= digits ws
digits  ::= "-"? ("0" | [1-9] [0-9]{0,15})
boolean ::= ("true" | "false") ws
null    ::= "null" ws
ws      ::= " "?
"#;

/// Keywords that say nothing about which texts are valid: read by people, not by the grammar.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "additionalProperties",
    "required",
];

/// How deep a schema may nest.
const MAX_DEPTH: usize = 16;

/// The grammar of any one JSON object.
pub fn json_object() -> String {
    format!("root ::= object\n{JSON_RULES}")
}

/// The grammar of the values of `schema`, or which keyword it cannot enforce.
pub fn json_schema(schema: &Value) -> Result<String, String> {
    let mut rules = Vec::new();
    let root = expression(schema, &mut rules, 0)?;
    Ok(grammar(format!("root ::= {root}\n"), &rules))
}

/// The grammar of tool calls in the `<tool_call>` format of Hermes- and Qwen-style chat
/// templates: one call (or, with `parallel`, one or more), each naming one of `tools` (name,
/// parameters schema) with arguments of its schema, name first.
pub fn tool_calls(tools: &[(&str, &Value)], parallel: bool) -> Result<String, String> {
    let mut rules = Vec::new();
    let mut calls = Vec::new();
    for (name, parameters) in tools {
        let arguments = expression(parameters, &mut rules, 0)?;
        let head = literal(&format!(
            "{{\"name\": {}, \"arguments\": ",
            Value::from(*name)
        ));
        calls.push(format!(r#"{head} {arguments} "}}""#));
    }
    let repeat = if parallel { r#" ("\n" block)*"# } else { "" };
    let head = format!(
        "root ::= block{repeat}\nblock ::= \"<tool_call>\\n\" ({}) \"\\n</tool_call>\"\n",
        calls.join(" | ")
    );
    Ok(grammar(head, &rules))
}

/// A whole grammar: `head` (its `root`), the numbered `rules` it refers to, the JSON rules.
fn grammar(mut head: String, rules: &[String]) -> String {
    for (index, rule) in rules.iter().enumerate() {
        head.push_str(&format!("schema{index} ::= {rule}\n"));
    }
    head.push_str(JSON_RULES);
    head
}

/// A GBNF literal that matches `text` exactly.
fn literal(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 2);
    escaped.push('"');
    for c in text.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c => escaped.push(c),
        }
    }
    escaped.push('"');
    escaped
}

/// The literal of JSON value `value`, followed by whitespace.
fn json_literal(value: &Value) -> String {
    format!("{} ws", literal(&value.to_string()))
}

/// The grammar expression of `schema`'s values; nested parts become rules of `rules`.
fn expression(schema: &Value, rules: &mut Vec<String>, depth: usize) -> Result<String, String> {
    if depth > MAX_DEPTH {
        return Err(format!("the schema nests deeper than {MAX_DEPTH} levels"));
    }
    let schema = match schema {
        Value::Bool(true) => return Ok("value".into()),
        Value::Object(schema) => schema,
        _ => return Err("a schema must be an object (or true)".into()),
    };
    let known = ["type", "properties", "items", "enum", "const", "anyOf"];
    if let Some(keyword) = schema
        .keys()
        .find(|k| !known.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
    {
        return Err(format!("the schema keyword `{keyword}` is not supported"));
    }
    if let Some(value) = schema.get("const") {
        return Ok(json_literal(value));
    }
    if let Some(values) = schema.get("enum") {
        let values = values.as_array().filter(|v| !v.is_empty());
        let values = values.ok_or("`enum` must list at least one value")?;
        let choices: Vec<String> = values.iter().map(json_literal).collect();
        return Ok(format!("({})", choices.join(" | ")));
    }
    if let Some(choices) = schema.get("anyOf") {
        let choices = choices.as_array().filter(|c| !c.is_empty());
        let choices = choices.ok_or("`anyOf` must list at least one schema")?;
        let mut alternatives = Vec::new();
        for choice in choices {
            alternatives.push(rule(choice, rules, depth)?);
        }
        return Ok(format!("({})", alternatives.join(" | ")));
    }
    match schema.get("type") {
        None => Ok("value".into()),
        Some(Value::String(kind)) => typed(kind, schema, rules, depth),
        Some(Value::Array(kinds)) if !kinds.is_empty() => {
            let mut alternatives = Vec::new();
            for kind in kinds {
                let kind = kind.as_str().ok_or("`type` must name types")?;
                alternatives.push(typed(kind, schema, rules, depth)?);
            }
            Ok(format!("({})", alternatives.join(" | ")))
        }
        Some(_) => Err("`type` must name a type or list types".into()),
    }
}

/// A rule of its own for `schema` (for the parts of a larger one); its name.
fn rule(schema: &Value, rules: &mut Vec<String>, depth: usize) -> Result<String, String> {
    let body = expression(schema, rules, depth + 1)?;
    rules.push(body);
    Ok(format!("schema{}", rules.len() - 1))
}

/// The expression of the values of type `kind` that `schema` allows.
fn typed(
    kind: &str,
    schema: &Map<String, Value>,
    rules: &mut Vec<String>,
    depth: usize,
) -> Result<String, String> {
    match kind {
        "string" | "number" | "integer" | "boolean" | "null" => Ok(kind.to_string()),
        "array" => match schema.get("items") {
            None => Ok("array".into()),
            Some(items) => {
                let item = rule(items, rules, depth)?;
                Ok(format!(r#"("[" ws ( {item} ("," ws {item})* )? "]" ws)"#))
            }
        },
        "object" => match schema.get("properties") {
            None => Ok("object".into()),
            Some(Value::Object(properties)) if properties.is_empty() => {
                Ok(r#"("{" ws "}" ws)"#.into())
            }
            Some(Value::Object(properties)) => {
                let mut members = Vec::new();
                for (name, property) in properties {
                    let value = rule(property, rules, depth)?;
                    members.push(format!(
                        r#"{} ":" ws {value}"#,
                        json_literal(&Value::from(name.as_str()))
                    ));
                }
                Ok(format!(
                    r#"("{{" ws {} "}}" ws)"#,
                    members.join(r#" "," ws "#)
                ))
            }
            Some(_) => Err("`properties` must be an object".into()),
        },
        other => Err(format!("the schema type `{other}` is not a JSON type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_object_schema_writes_every_property_by_name() {
        let schema = json!({
            "type": "object",
            "title": "A city",
            "properties": {
                "city": {"type": "string"},
                "population": {"type": "integer"},
                "kind": {"enum": ["capital", "town"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city"],
            "additionalProperties": false,
        });
        let grammar = json_schema(&schema).unwrap();
        let root = grammar.lines().next().unwrap();
        assert!(
            root.starts_with(r#"root ::= ("{" ws "\"city\"" ws ":" ws schema0 "," ws "\"kind\"""#),
            "{grammar}"
        );
        assert!(
            grammar.contains(r#"schema1 ::= ("\"capital\"" ws | "\"town\"" ws)"#),
            "{grammar}"
        );
        assert!(grammar.contains(r#"schema2 ::= integer"#), "{grammar}");
        assert!(
            grammar.contains("schema4 ::= (\"[\" ws ( schema3"),
            "{grammar}"
        );
    }

    #[test]
    fn keywords_the_grammar_cannot_enforce_are_refused_by_name() {
        for (schema, keyword) in [
            (json!({"type": "string", "pattern": "^a"}), "pattern"),
            (
                json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}),
                "minimum",
            ),
            (json!({"$ref": "#/defs/x"}), "$ref"),
        ] {
            let refused = json_schema(&schema).unwrap_err();
            assert!(refused.contains(&format!("`{keyword}`")), "{refused}");
        }
        assert!(json_schema(&json!({"type": "date"})).is_err());
        let mut deep = json!({"type": "string"});
        for _ in 0..20 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(json_schema(&deep).unwrap_err().contains("deeper"));
    }

    #[test]
    fn tool_calls_name_a_tool_then_its_arguments() {
        let weather = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let any = json!({"type": "object"});
        let one = tool_calls(&[("weather", &weather), ("time", &any)], false).unwrap();
        assert!(
            one.starts_with("root ::= block\nblock ::= \"<tool_call>\\n\" ("),
            "{one}"
        );
        assert!(
            one.contains(r#""{\"name\": \"weather\", \"arguments\": " "#),
            "{one}"
        );
        assert!(
            one.contains(r#""{\"name\": \"time\", \"arguments\": " object "}""#),
            "{one}"
        );
        let many = tool_calls(&[("weather", &weather)], true).unwrap();
        assert!(
            many.starts_with(r#"root ::= block ("\n" block)*"#),
            "{many}"
        );
        let bad = json!({"type": "string", "pattern": "x"});
        assert!(tool_calls(&[("f", &bad)], false)
            .unwrap_err()
            .contains("pattern"));
    }

    #[test]
    fn literals_escape_what_gbnf_would_read_otherwise() {
        assert_eq!(literal(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(literal("line\nbreak"), r#""line\nbreak""#);
    }
}
