//! The operation a StateMigration asks for, read from its spec.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::runner::Runner;
use crate::api::state_migration::StateMigrationSpec;

/// The requested operation, as the spec says it.
#[derive(Clone, Debug)]
pub enum Requested {
    Upgrade { target: Option<i32> },
    RunnerUpgrade { runner: Box<Runner> },
    Rollback { backup_id: Option<String> },
    Reset,
    Import,
    Copy { store: String },
}

impl Requested {
    /// The operation of a spec, or why the spec cannot work (the CRD's rules catch most of it;
    /// this is the last word for objects created before a rule existed).
    pub fn from_spec(spec: &StateMigrationSpec) -> Result<Self, String> {
        let set = [
            spec.upgrade.is_some(),
            spec.rollback.is_some(),
            spec.reset.is_some(),
            spec.import.is_some(),
            spec.copy_from.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set != 1 {
            return Err(
                "set exactly one operation: upgrade, rollback, reset, import or copyFrom".into(),
            );
        }
        if let Some(upgrade) = &spec.upgrade {
            return match (&upgrade.target_version, &upgrade.runner) {
                (Some(_), Some(_)) => Err(
                    "upgrade takes either targetVersion (statekeeper's schema) or runner (the \
                     framework's own migration), not both"
                        .into(),
                ),
                (_, Some(runner)) => Ok(Requested::RunnerUpgrade {
                    runner: Box::new(runner.clone()),
                }),
                (None, None) => Ok(Requested::Upgrade { target: None }),
                (Some(IntOrString::Int(version)), None) if *version >= 1 => {
                    Ok(Requested::Upgrade {
                        target: Some(*version),
                    })
                }
                (Some(IntOrString::String(text)), None) if text == "latest" => {
                    Ok(Requested::Upgrade { target: None })
                }
                (Some(IntOrString::String(text)), None)
                    if text.parse::<i32>().is_ok_and(|v| v >= 1) =>
                {
                    Ok(Requested::Upgrade {
                        target: text.parse().ok(),
                    })
                }
                (Some(other), None) => Err(format!(
                    "upgrade.targetVersion must be a version number (1 or more) or \"latest\", not {}",
                    match other {
                        IntOrString::Int(v) => v.to_string(),
                        IntOrString::String(s) => format!("\"{s}\""),
                    }
                )),
            };
        }
        if let Some(rollback) = &spec.rollback {
            return Ok(Requested::Rollback {
                backup_id: rollback.backup_id.clone(),
            });
        }
        if spec.reset.is_some() {
            return Ok(Requested::Reset);
        }
        if let Some(import) = &spec.import {
            if import.source.is_some() == import.from_export.is_some() {
                return Err("set either import.source or import.fromExport".into());
            }
            return Ok(Requested::Import);
        }
        match &spec.copy_from {
            Some(copy) if copy.store_ref.name == spec.store_ref.name => {
                Err("copyFrom names the store itself: name another StateStore".into())
            }
            Some(copy) => Ok(Requested::Copy {
                store: copy.store_ref.name.clone(),
            }),
            None => Err("no operation".into()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Requested::Upgrade { .. } | Requested::RunnerUpgrade { .. } => "upgrade",
            Requested::Rollback { .. } => "rollback",
            Requested::Reset => "reset",
            Requested::Import => "import",
            Requested::Copy { .. } => "copy",
        }
    }
}
