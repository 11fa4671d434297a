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

/// An EC2 `Name` for a machine: 1 to 128 of letters, digits and `._-`.
pub(crate) fn ec2_name(field: &str, name: &str) -> Result<(), InvalidInput> {
    named(field, name, 128, "letters, digits and ._-", |c| {
        c.is_ascii_alphanumeric() || "._-".contains(c)
    })
}

/// An AMI id: `ami-` and 8 or 17 lower-case hex digits.
pub(crate) fn image_id(field: &str, id: &str) -> Result<(), InvalidInput> {
    let hex = id.strip_prefix("ami-").unwrap_or("");
    let ok = (hex.len() == 8 || hex.len() == 17)
        && hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::new(
            field,
            format!("{id:?} is not an AMI id (ami- and 8 or 17 lower-case hex digits)"),
        ))
    }
}

/// An instance type: a family and a size joined by one dot, each of lower-case letters,
/// digits and `-` (`t3.micro`, `m5d.2xlarge`).
pub(crate) fn instance_type(field: &str, kind: &str) -> Result<(), InvalidInput> {
    let part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    match kind.split_once('.') {
        Some((family, size)) if kind.len() <= 32 && part(family) && part(size) => Ok(()),
        _ => Err(InvalidInput::new(
            field,
            format!("{kind:?} is not an instance type (family.size, e.g. t3.micro)"),
        )),
    }
}

/// An availability zone: 1 to 32 of lower-case letters, digits and `-` (`us-east-1a`).
pub(crate) fn availability_zone(field: &str, zone: &str) -> Result<(), InvalidInput> {
    named(field, zone, 32, "lower-case letters, digits and -", |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })
}

/// A device name for a data volume: `/dev/sd[f-p]` or `/dev/xvd[f-p]`.
pub(crate) fn device(field: &str, device: &str) -> Result<(), InvalidInput> {
    let letter = device
        .strip_prefix("/dev/sd")
        .or_else(|| device.strip_prefix("/dev/xvd"));
    match letter {
        Some(l) if l.len() == 1 && ('f'..='p').contains(&l.chars().next().unwrap_or('a')) => {
            Ok(())
        }
        _ => Err(InvalidInput::new(
            field,
            format!("{device:?} is not a data volume's device (/dev/sdf to /dev/sdp, or /dev/xvdf to /dev/xvdp)"),
        )),
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

/// An S3 bucket name: 3 to 63 of lowercase letters, digits, `.` and `-`, starting and
/// ending with a letter or digit.
pub(crate) fn bucket(field: &str, name: &str) -> Result<(), InvalidInput> {
    let edges = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
        && edges(name.chars().next())
        && edges(name.chars().last());
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::new(
            field,
            format!(
                "{name:?} is not a bucket name: 3 to 63 of lowercase letters, digits, . and -, \
                 starting and ending with a letter or digit"
            ),
        ))
    }
}

/// A SHA-256 in hex: 64 hex digits.
pub(crate) fn sha256(field: &str, digest: &str) -> Result<(), InvalidInput> {
    if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(InvalidInput::new(
            field,
            format!("{digest:?} is not 64 hex digits"),
        ))
    }
}

/// An absolute local path.
pub(crate) fn absolute_path(field: &str, path: &std::path::Path) -> Result<(), InvalidInput> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(InvalidInput::new(
            field,
            format!("{} must be an absolute path", path.display()),
        ))
    }
}

/// A file name: 1 to 200 bytes (the hand-off's temporary name adds the step's key), no `/`
/// or NUL, not starting with `.` (dotfiles are the temporary names of the file hand-off) and
/// not ending with `.sha256` (its markers).
pub(crate) fn file_name(field: &str, name: &str) -> Result<(), InvalidInput> {
    let ok = !name.is_empty()
        && name.len() <= keel_steps::sftp::NAME_LEN_MAX
        && !name.starts_with('.')
        && !name.contains(['/', '\0'])
        && !name.ends_with(keel_steps::files::MARKER_SUFFIX);
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::new(
            field,
            format!(
                "{name:?} is not a file name: 1 to {} bytes, without / or NUL, not starting \
                 with . and not ending with .sha256",
                keel_steps::sftp::NAME_LEN_MAX
            ),
        ))
    }
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
    fn ec2_fields_are_checked_with_the_field_named() {
        assert!(image_id("image_id", "ami-760aaa0f").is_ok());
        assert!(image_id("image_id", "ami-04681a1dbd79675a5").is_ok());
        for bad in ["ami-760AAA0F", "760aaa0f", "ami-760aaa0", "ami-"] {
            let e = image_id("image_id", bad).unwrap_err();
            assert_eq!(e.field, "image_id", "{bad}");
        }
        assert!(instance_type("t", "t3.micro").is_ok());
        assert!(instance_type("t", "m5d.2xlarge").is_ok());
        for bad in ["t3", "t3.", ".micro", "T3.micro", "t3.micro.x"] {
            assert!(instance_type("t", bad).is_err(), "{bad}");
        }
        assert!(device("d", "/dev/sdf").is_ok());
        assert!(device("d", "/dev/xvdp").is_ok());
        for bad in ["/dev/sda", "/dev/sdq", "/dev/sdff", "sdf"] {
            assert!(device("d", bad).is_err(), "{bad}");
        }
        assert!(availability_zone("z", "us-east-1a").is_ok());
        assert!(availability_zone("z", "US-EAST-1A").is_err());
        assert!(ec2_name("name", "web-1.a_b").is_ok());
        assert!(ec2_name("name", "web 1").is_err());
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
