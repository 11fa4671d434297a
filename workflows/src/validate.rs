//! Input checks shared by the workflows: AWS name rules and policy documents, checked
//! before anything is created so that a bad input fails with the field's name, not with a
//! half-built resource set and an SDK error.

use keel_engine::InvalidInput;

/// An IAM role name: 1 to `max` characters of letters, digits and `+=,.@_-`.
pub(crate) fn role_name(field: &str, name: &str, max: usize) -> Result<(), InvalidInput> {
    named(field, name, max, "letters, digits and +=,.@_-", |c| {
        c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
    })
}

/// An IoT thing name (also used for prefixes of derived names): 1 to `max` characters of
/// letters, digits and `:_-`.
pub(crate) fn thing_name(field: &str, name: &str, max: usize) -> Result<(), InvalidInput> {
    named(field, name, max, "letters, digits and :_-", |c| {
        c.is_ascii_alphanumeric() || ":_-".contains(c)
    })
}

/// An optional timeout in seconds: when given, 1 to `max`. The bound keeps a wait's deadline
/// meaningful, and far from what a deadline in milliseconds can hold.
pub(crate) fn timeout_s(field: &str, seconds: Option<u64>, max: u64) -> Result<(), InvalidInput> {
    match seconds {
        Some(0) => Err(InvalidInput::new(field, "must be at least 1")),
        Some(seconds) if seconds > max => Err(InvalidInput::new(
            field,
            format!("{seconds} is more than {max} ({})", days(max)),
        )),
        _ => Ok(()),
    }
}

/// `seconds` as days, for messages: "7 days".
fn days(seconds: u64) -> String {
    match seconds / (24 * 3600) {
        1 => "1 day".into(),
        n => format!("{n} days"),
    }
}

fn named(
    field: &str,
    name: &str,
    max: usize,
    allowed: &str,
    ok: impl Fn(char) -> bool,
) -> Result<(), InvalidInput> {
    if name.is_empty() || name.len() > max {
        return Err(InvalidInput::new(
            field,
            format!("{name:?} must be 1 to {max} characters long"),
        ));
    }
    if let Some(c) = name.chars().find(|c| !ok(*c)) {
        return Err(InvalidInput::new(
            field,
            format!("{name:?} holds {c:?}; allowed are {allowed}"),
        ));
    }
    Ok(())
}

/// A policy document: a JSON object with a `Statement` that is an object or a non-empty
/// array of objects, each with an `Effect` of `Allow` or `Deny`.
pub(crate) fn policy_document(field: &str, document: &str) -> Result<(), InvalidInput> {
    let value: serde_json::Value = serde_json::from_str(document)
        .map_err(|e| InvalidInput::new(field, format!("not JSON: {e}")))?;
    let statements = match value.get("Statement") {
        Some(serde_json::Value::Array(s)) if !s.is_empty() => s.clone(),
        Some(s @ serde_json::Value::Object(_)) => vec![s.clone()],
        _ => {
            return Err(InvalidInput::new(
                field,
                "must be a JSON object with a Statement (an object or a non-empty array)",
            ))
        }
    };
    for (i, statement) in statements.iter().enumerate() {
        match statement.get("Effect").and_then(|e| e.as_str()) {
            Some("Allow" | "Deny") => {}
            _ => {
                return Err(InvalidInput::new(
                    format!("{field}.Statement[{i}]"),
                    "Effect must be \"Allow\" or \"Deny\"",
                ))
            }
        }
    }
    Ok(())
}

/// A count within `min..=max`.
pub(crate) fn count(field: &str, n: usize, min: usize, max: usize) -> Result<(), InvalidInput> {
    if n < min || n > max {
        return Err(InvalidInput::new(
            field,
            format!("{n} is outside {min}..={max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_documents_are_checked_with_the_field_named() {
        assert!(role_name("name", "greengrass-core_role.1", 64).is_ok());
        let e = role_name("name", "has space", 64).unwrap_err();
        assert_eq!(e.field, "name");
        assert!(e.reason.contains("' '"), "{}", e.reason);
        assert!(role_name("name", &"r".repeat(65), 64).is_err());
        assert!(thing_name("devices[2].name", "", 128).is_err());
        assert!(policy_document("policy", r#"{"Statement":[{"Effect":"Allow"}]}"#).is_ok());
        assert!(policy_document("policy", "{")
            .unwrap_err()
            .reason
            .starts_with("not JSON"));
        let e = policy_document("policy", r#"{"Statement":[{"Effect":"Maybe"}]}"#).unwrap_err();
        assert_eq!(e.field, "policy.Statement[0]");
        assert!(count("devices", 0, 1, 1000).is_err());
    }

    #[test]
    fn timeouts_are_bounded_on_both_sides_when_given() {
        assert!(timeout_s("t", None, 60).is_ok());
        assert!(timeout_s("t", Some(1), 86_400).is_ok());
        assert!(timeout_s("t", Some(86_400), 86_400).is_ok());
        assert_eq!(
            timeout_s("t", Some(0), 60).unwrap_err(),
            InvalidInput::new("t", "must be at least 1")
        );
        assert_eq!(
            timeout_s("t", Some(86_401), 86_400).unwrap_err(),
            InvalidInput::new("t", "86401 is more than 86400 (1 day)")
        );
    }
}
