//! `--output=human|json`.

use crate::failure::{CliResult, Failure};

/// How a subcommand prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// qemu-img's text.
    Human,
    /// qemu-img's JSON.
    Json,
}

impl OutputFormat {
    /// Parses the `--output` argument.
    ///
    /// # Errors
    /// With qemu-img's message (naming `command`) for anything but `human` and `json`.
    pub fn parse(s: &str, command: &str) -> CliResult<Self> {
        match s {
            "human" => Ok(OutputFormat::Human),
            "json" => Ok(OutputFormat::Json),
            _ => Err(Failure::new(format!(
                "--output expects 'human' or 'json' not '{s}'\nTry 'img {command} --help' for more info"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_output_rejects_other_words() {
        assert_eq!(
            OutputFormat::parse("json", "info").unwrap(),
            OutputFormat::Json
        );
        assert!(OutputFormat::parse("xml", "info").is_err());
    }
}
