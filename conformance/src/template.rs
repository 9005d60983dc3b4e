//! Address templates inside policies: `{{ip NS/POD}}`, `{{hostbits}}`, `{{net4 NS/POD}}`.
//!
//! ipBlocks must name real pod addresses, which only exist once pods run. A case file writes
//! templates in any string of a policy; the runner substitutes them when it creates the policy,
//! for the run's family (IPv4 by default; a runner replaying a file in IPv6-only mode gets the
//! pods' IPv6 addresses and `128`). `net4` is the pod's address masked to its first 4 bits,
//! written `<network>/4`: a block that holds the pod and a sixteenth of the address space.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;
use weft_netpol::ruleset::Family;

use crate::case::PodRef;

/// A template that cannot be parsed or filled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without `}}`, or an argument where none belongs.
    #[error("malformed template in {text:?}: {reason}")]
    Syntax {
        /// The string holding it.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// A name other than `ip`, `hostbits`, `net4`.
    #[error("unknown template {{{{{name} ...}}}} (known: ip NS/POD, hostbits, net4 NS/POD)")]
    UnknownName {
        /// The name.
        name: String,
    },
    /// The pod has no address of the run's family (or does not exist).
    #[error("{{{{{name} {pod}}}}}: pod {pod} has no {family} address")]
    NoAddress {
        /// Template name.
        name: String,
        /// The pod.
        pod: PodRef,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
}

/// One template occurrence.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Template {
    /// `{{ip NS/POD}}`
    Ip(PodRef),
    /// `{{hostbits}}`
    HostBits,
    /// `{{net4 NS/POD}}`
    Net4(PodRef),
}

/// A string split into literal text and templates.
enum Piece {
    Text(String),
    Template(Template),
}

fn parse_string(text: &str) -> Result<Vec<Piece>, TemplateError> {
    let syntax = |reason: &str| TemplateError::Syntax {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            pieces.push(Piece::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| syntax("`{{` without `}}`"))?;
        let words: Vec<&str> = after[..end].split_whitespace().collect();
        let pod = |words: &[&str]| -> Result<PodRef, TemplateError> {
            match words {
                [_, pod] => pod
                    .parse::<PodRef>()
                    .map_err(|e| syntax(&format!("{}: {e}", words[0]))),
                _ => Err(syntax(&format!("{} takes one NS/POD argument", words[0]))),
            }
        };
        let template = match words.first().copied() {
            Some("ip") => Template::Ip(pod(&words)?),
            Some("net4") => Template::Net4(pod(&words)?),
            Some("hostbits") if words.len() == 1 => Template::HostBits,
            Some("hostbits") => return Err(syntax("hostbits takes no argument")),
            Some(other) => {
                return Err(TemplateError::UnknownName {
                    name: other.to_string(),
                });
            }
            None => return Err(syntax("empty `{{}}`")),
        };
        pieces.push(Piece::Template(template));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Ok(pieces)
}

/// Visits every string in a JSON value.
fn strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// The pods a value's templates refer to (with repeats), or the first malformed template.
pub fn referenced_pods(value: &Value) -> Result<Vec<PodRef>, TemplateError> {
    let mut all = Vec::new();
    strings(value, &mut all);
    let mut pods = Vec::new();
    for text in all {
        for piece in parse_string(text)? {
            if let Piece::Template(Template::Ip(pod) | Template::Net4(pod)) = piece {
                pods.push(pod);
            }
        }
    }
    Ok(pods)
}

/// Whether a value holds any template.
pub fn has_templates(value: &Value) -> bool {
    let mut all = Vec::new();
    strings(value, &mut all);
    all.iter().any(|s| s.contains("{{"))
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// Substitutes every template of `value` for `family`; `address_of` gives a pod's address of
/// that family.
pub fn render(
    value: &Value,
    family: Family,
    address_of: &dyn Fn(&PodRef) -> Option<IpAddr>,
) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(text) if text.contains("{{") => {
            let mut out = String::new();
            for piece in parse_string(text)? {
                match piece {
                    Piece::Text(t) => out.push_str(&t),
                    Piece::Template(Template::HostBits) => out.push_str(match family {
                        Family::V4 => "32",
                        Family::V6 => "128",
                    }),
                    Piece::Template(Template::Ip(pod)) => {
                        let ip = lookup(&pod, "ip", family, address_of)?;
                        out.push_str(&ip.to_string());
                    }
                    Piece::Template(Template::Net4(pod)) => {
                        let ip = lookup(&pod, "net4", family, address_of)?;
                        let net = IpNet::new(ip, 4)
                            .expect("4 is a valid prefix length for both families")
                            .trunc();
                        out.push_str(&net.to_string());
                    }
                }
            }
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render(v, family, address_of))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, family, address_of)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

fn lookup(
    pod: &PodRef,
    name: &str,
    family: Family,
    address_of: &dyn Fn(&PodRef) -> Option<IpAddr>,
) -> Result<IpAddr, TemplateError> {
    address_of(pod).ok_or_else(|| TemplateError::NoAddress {
        name: name.to_string(),
        pod: pod.clone(),
        family: family_name(family),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn addresses(pod: &PodRef) -> Option<IpAddr> {
        match pod.to_string().as_str() {
            "x/b" => Some("10.244.129.2".parse().expect("literal")),
            "x/b6" => Some("fd00:10:244:81::2".parse().expect("literal")),
            _ => None,
        }
    }

    #[test]
    fn templates_are_filled_for_the_family() {
        let value = json!({"cidr": "{{net4 x/b}}", "except": ["{{ip x/b}}/{{hostbits}}"], "n": 3});
        let v4 = render(&value, Family::V4, &addresses).expect("renders");
        assert_eq!(
            v4,
            json!({"cidr": "0.0.0.0/4", "except": ["10.244.129.2/32"], "n": 3})
        );
        let value6 = json!({"cidr": "{{ net4 x/b6 }}", "except": ["{{ip x/b6}}/{{hostbits}}"]});
        let v6 = render(&value6, Family::V6, &addresses).expect("renders");
        assert_eq!(
            v6,
            json!({"cidr": "f000::/4", "except": ["fd00:10:244:81::2/128"]})
        );
    }

    #[test]
    fn template_errors_name_the_problem() {
        let missing = render(&json!("{{ip y/a}}"), Family::V4, &addresses).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "{{ip y/a}}: pod y/a has no IPv4 address"
        );
        let unknown = referenced_pods(&json!(["{{mask x/a}}"])).unwrap_err();
        assert!(matches!(unknown, TemplateError::UnknownName { ref name } if name == "mask"));
        let open = referenced_pods(&json!("{{ip x/a")).unwrap_err();
        assert!(matches!(open, TemplateError::Syntax { .. }));
        let bad_pod = referenced_pods(&json!("{{ip xa}}")).unwrap_err();
        assert!(matches!(bad_pod, TemplateError::Syntax { .. }));
        assert_eq!(
            referenced_pods(&json!({"a": ["{{ip x/a}}/{{hostbits}}", "{{net4 y/b}}"]})),
            Ok(vec![
                "x/a".parse().expect("valid"),
                "y/b".parse().expect("valid")
            ])
        );
    }
}
