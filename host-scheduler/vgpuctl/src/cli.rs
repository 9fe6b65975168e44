//! The command line, and the scheduler request each command sends.

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use serde_json::json;
use vgpu_vmm::target::VmTarget;

use crate::api::{slice_path, ApiRequest, SliceSpec, SliceUpdate, BEST_EFFORT, LATENCY_CRITICAL};
use crate::size::parse_size;
use crate::usage::{export_request, usage_request, UsageArgs, UsageCommand};

/// Manages vGPU slices through the vgpu scheduler and attaches them to VMs.
#[derive(Debug, Parser)]
#[command(name = "vgpuctl", version)]
pub struct Cli {
    /// The scheduler's API: its Unix socket (STATE_DIR/api.sock) or http://HOST:PORT.
    /// Default: $VGPU_SCHEDULER, else /var/lib/vgpu/api.sock.
    #[arg(long, global = true, value_name = "PATH_OR_URL")]
    pub scheduler: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A slice's scheduling class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Class {
    /// Dispatches at once; best-effort work yields to it.
    #[value(name = "latency-critical", alias = "lc")]
    LatencyCritical,
    /// Gets its guarantee, and idle time shared by weight.
    #[value(name = "best-effort", alias = "be")]
    BestEffort,
}

impl Class {
    /// The name the API uses.
    pub fn api_name(self) -> &'static str {
        match self {
            Class::LatencyCritical => LATENCY_CRITICAL,
            Class::BestEffort => BEST_EFFORT,
        }
    }
}

/// Compute percentages, 0 to 100.
fn percent(text: &str) -> Result<u32, String> {
    match text.trim_end_matches('%').parse::<u32>() {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(format!("{text:?} is not a whole percentage from 0 to 100")),
    }
}

/// Seconds between redraws: positive, at most a day.
fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!("{text:?} is not a number of seconds above 0")),
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Creates a slice (admission may refuse it: guarantees cannot oversubscribe a GPU).
    Create {
        /// Slice name: lowercase letters, digits and '-'.
        name: String,
        /// The tenant it belongs to.
        #[arg(long)]
        tenant: String,
        /// GPU index [scheduler default: 0].
        #[arg(long, value_name = "N")]
        gpu: Option<u32>,
        /// Scheduling class [scheduler default: best-effort].
        #[arg(long, value_enum)]
        class: Option<Class>,
        /// Guaranteed compute, percent of the GPU.
        #[arg(long, value_name = "PCT", value_parser = percent)]
        compute: Option<u32>,
        /// Maximum compute, percent of the GPU [scheduler default: 100].
        #[arg(long, value_name = "PCT", value_parser = percent)]
        max_compute: Option<u32>,
        /// Guaranteed memory, such as 8GiB [scheduler default: 0].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        memory_guarantee: Option<u64>,
        /// Memory limit, such as 16GiB [scheduler default: the GPU's memory].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        memory_limit: Option<u64>,
        /// Share of idle time relative to other best-effort slices [scheduler default: 1].
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
        /// Starts the slice's backend at once.
        #[arg(long)]
        attach: bool,
    },
    /// Lists the slices.
    List {
        /// Prints the scheduler's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Changes a slice's guarantees and limits (admission may refuse).
    #[command(group(ArgGroup::new("changes").required(true).multiple(true)))]
    Resize {
        /// The slice.
        name: String,
        /// Guaranteed compute, percent of the GPU.
        #[arg(long, value_name = "PCT", value_parser = percent, group = "changes")]
        compute: Option<u32>,
        /// Maximum compute, percent of the GPU.
        #[arg(long, value_name = "PCT", value_parser = percent, group = "changes")]
        max_compute: Option<u32>,
        /// Guaranteed memory, such as 8GiB.
        #[arg(long, value_name = "SIZE", value_parser = parse_size, group = "changes")]
        memory_guarantee: Option<u64>,
        /// Memory limit, such as 16GiB (`--memory` for short). An attached slice takes the
        /// new limit at once; below what it holds, its allocations fail until it frees.
        #[arg(long, alias = "memory", value_name = "SIZE", value_parser = parse_size, group = "changes")]
        memory_limit: Option<u64>,
        /// Weight.
        #[arg(long, value_name = "W", group = "changes")]
        weight: Option<u32>,
    },
    /// Deletes a slice (its backend is stopped).
    Delete {
        /// The slice.
        name: String,
    },
    /// Starts a slice's backend; with --vm also hotplugs it into a running VM.
    Attach {
        /// The slice's name; with --vm, an absolute backend socket path hotplugs that socket
        /// without asking the scheduler.
        name: String,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Stops a slice's backend; with --vm first unplugs it from the VM.
    Detach {
        /// The slice's name; with --vm, an absolute backend socket path only unplugs (--id
        /// needed) without asking the scheduler.
        name: String,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Takes a slice's device memory: its backend freezes it and swaps its memory out to host
    /// memory (nothing is lost; `restore` gives it back).
    Reclaim {
        /// The slice.
        name: String,
    },
    /// Gives a reclaimed slice its memory back at the same addresses; it runs on.
    Restore {
        /// The slice.
        name: String,
    },
    /// Shows each slice's device memory: guarantee, limit, resident, swapped, reclaims.
    Memory {
        /// Prints the scheduler's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Shows live per-slice utilization.
    Util {
        /// Redraws the table every SECONDS until interrupted (with --json: one JSON document a
        /// line).
        #[arg(long, value_name = "SECONDS", value_parser = seconds)]
        watch: Option<f64>,
        /// Prints the scheduler's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prints tenants' usage from the ledger (CSV or JSON Lines); `usage export` exports it
    /// incrementally for billing.
    #[command(args_conflicts_with_subcommands = true)]
    Usage {
        /// `export`: the incremental export.
        #[command(subcommand)]
        export: Option<UsageCommand>,
        #[command(flatten)]
        args: UsageArgs,
    },
}

/// The VM options of attach and detach.
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// The VM, as cloud-hypervisor:/path/to/api.sock (its --api-socket).
    #[arg(long, value_name = "cloud-hypervisor:API_SOCKET")]
    pub vm: Option<VmTarget>,
    /// The device id in the VM [default: the slice name; for a socket path, attach lets the
    /// VMM pick one].
    #[arg(long, value_name = "ID", requires = "vm")]
    pub id: Option<String>,
    /// Seconds to wait for each answer from the VMM.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, requires = "vm")]
    pub timeout: u64,
}

impl Command {
    /// The scheduler request this command sends. With --vm, attach and detach send theirs
    /// around the VM hotplug (see [`crate::run`]).
    pub fn request(&self) -> ApiRequest {
        match self {
            Command::Create {
                name,
                tenant,
                gpu,
                class,
                compute,
                max_compute,
                memory_guarantee,
                memory_limit,
                weight,
                attach,
            } => {
                let spec = SliceSpec {
                    name: name.clone(),
                    tenant: tenant.clone(),
                    gpu: *gpu,
                    class: class.map(|c| c.api_name().to_owned()),
                    compute_guarantee_pct: *compute,
                    compute_max_pct: *max_compute,
                    memory_guarantee: *memory_guarantee,
                    memory_limit: *memory_limit,
                    weight: *weight,
                    attach: *attach,
                };
                ApiRequest::with_body("POST", "/v1/slices", json!(spec))
            }
            Command::List { .. } => ApiRequest::new("GET", "/v1/slices"),
            Command::Resize {
                name,
                compute,
                max_compute,
                memory_guarantee,
                memory_limit,
                weight,
            } => {
                let update = SliceUpdate {
                    compute_guarantee_pct: *compute,
                    compute_max_pct: *max_compute,
                    memory_guarantee: *memory_guarantee,
                    memory_limit: *memory_limit,
                    weight: *weight,
                };
                ApiRequest::with_body("PATCH", slice_path(name), json!(update))
            }
            Command::Delete { name } => ApiRequest::new("DELETE", slice_path(name)),
            Command::Attach { name, .. } => {
                ApiRequest::new("POST", format!("{}/attach", slice_path(name)))
            }
            Command::Detach { name, .. } => {
                ApiRequest::new("POST", format!("{}/detach", slice_path(name)))
            }
            Command::Util { .. } => ApiRequest::new("GET", "/v1/util"),
            Command::Reclaim { name } => {
                ApiRequest::new("POST", format!("{}/reclaim", slice_path(name)))
            }
            Command::Restore { name } => {
                ApiRequest::new("POST", format!("{}/restore", slice_path(name)))
            }
            Command::Memory { .. } => ApiRequest::new("GET", "/v1/memory"),
            Command::Usage { export, args } => match export {
                None => usage_request(args),
                Some(UsageCommand::Export {
                    since_cursor,
                    limit,
                    ..
                }) => export_request(*since_cursor, *limit),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use serde_json::Value;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vgpuctl").chain(args.iter().copied()))
    }

    fn request(args: &[&str]) -> (&'static str, String, Option<Value>) {
        let r = parse(args).unwrap().command.request();
        (r.method, r.path, r.body)
    }

    #[test]
    fn reclaim_restore_and_memory_address_the_memory_endpoints() {
        assert_eq!(
            request(&["reclaim", "be"]),
            ("POST", "/v1/slices/be/reclaim".to_string(), None)
        );
        assert_eq!(
            request(&["restore", "be"]),
            ("POST", "/v1/slices/be/restore".to_string(), None)
        );
        assert_eq!(
            request(&["memory"]),
            ("GET", "/v1/memory".to_string(), None)
        );
    }

    #[test]
    fn create_with_every_option_posts_the_full_spec() {
        let (method, path, body) = request(&[
            "create",
            "lc",
            "--tenant",
            "acme",
            "--gpu",
            "1",
            "--class",
            "latency-critical",
            "--compute",
            "30",
            "--max-compute",
            "100%",
            "--memory-guarantee",
            "8GiB",
            "--memory-limit",
            "16GiB",
            "--weight",
            "2",
            "--attach",
        ]);
        assert_eq!((method, path.as_str()), ("POST", "/v1/slices"));
        assert_eq!(
            body.unwrap(),
            json!({"name": "lc", "tenant": "acme", "gpu": 1, "class": "latency-critical",
                   "compute_guarantee_pct": 30, "compute_max_pct": 100,
                   "memory_guarantee": 8589934592u64, "memory_limit": 17179869184u64,
                   "weight": 2, "attach": true})
        );
    }

    #[test]
    fn create_with_only_a_tenant_leaves_defaults_to_the_scheduler() {
        let (_, _, body) = request(&["create", "be", "--tenant", "t", "--class", "be"]);
        assert_eq!(
            body.unwrap(),
            json!({"name": "be", "tenant": "t", "class": "best-effort"})
        );
    }

    #[test]
    fn create_without_a_tenant_is_a_usage_error() {
        let err = parse(&["create", "lc"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn bad_sizes_and_percentages_are_usage_errors() {
        for args in [
            [
                "create",
                "x",
                "--tenant",
                "t",
                "--memory-limit",
                "16 apples",
            ],
            ["create", "x", "--tenant", "t", "--compute", "101"],
            ["create", "x", "--tenant", "t", "--class", "urgent"],
        ] {
            let err = parse(&args).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ),
                "{args:?}: {err}"
            );
        }
    }

    #[test]
    fn resize_patches_only_the_given_fields() {
        let (method, path, body) = request(&[
            "resize",
            "lc",
            "--compute",
            "50",
            "--memory-limit",
            "512MiB",
        ]);
        assert_eq!((method, path.as_str()), ("PATCH", "/v1/slices/lc"));
        assert_eq!(
            body.unwrap(),
            json!({"compute_guarantee_pct": 50, "memory_limit": 536870912})
        );
    }

    #[test]
    fn resize_without_changes_is_a_usage_error() {
        let err = parse(&["resize", "lc"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn simple_commands_map_to_their_endpoints() {
        assert_eq!(request(&["list"]), ("GET", "/v1/slices".to_owned(), None));
        assert_eq!(
            request(&["delete", "lc"]),
            ("DELETE", "/v1/slices/lc".to_owned(), None)
        );
        assert_eq!(
            request(&["attach", "lc"]),
            ("POST", "/v1/slices/lc/attach".to_owned(), None)
        );
        assert_eq!(
            request(&["detach", "lc"]),
            ("POST", "/v1/slices/lc/detach".to_owned(), None)
        );
        assert_eq!(
            request(&["util", "--watch", "0.5", "--json"]),
            ("GET", "/v1/util".to_owned(), None)
        );
    }

    #[test]
    fn scheduler_is_accepted_before_or_after_the_command() {
        let cli = parse(&["--scheduler", "/a.sock", "list"]).unwrap();
        assert_eq!(cli.scheduler.as_deref(), Some("/a.sock"));
        let cli = parse(&["list", "--scheduler", "http://h:1"]).unwrap();
        assert_eq!(cli.scheduler.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn vm_options_parse_and_id_needs_a_vm() {
        let cli = parse(&[
            "attach",
            "lc",
            "--vm",
            "cloud-hypervisor:/ch.sock",
            "--id",
            "g0",
        ])
        .unwrap();
        let Command::Attach { vm, .. } = cli.command else {
            panic!("not attach")
        };
        assert_eq!(vm.vm.unwrap().to_string(), "cloud-hypervisor:/ch.sock");
        assert_eq!(vm.id.as_deref(), Some("g0"));
        assert_eq!(vm.timeout, 30);

        let err = parse(&["detach", "lc", "--id", "g0"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        let err = parse(&["attach", "lc", "--vm", "/ch.sock"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("cloud-hypervisor:/path/to/api.sock"),
            "{err}"
        );
    }

    #[test]
    fn usage_and_export_map_to_the_usage_endpoints() {
        assert_eq!(
            request(&[
                "usage",
                "--tenant",
                "acme",
                "--from",
                "2025-01-01",
                "--format",
                "jsonl"
            ]),
            (
                "GET",
                "/v1/usage?format=json&tenant=acme&from=2025-01-01".to_owned(),
                None
            )
        );
        assert_eq!(
            request(&["usage", "export", "--since-cursor", "7", "--limit", "100"]),
            (
                "GET",
                "/v1/usage/export?since_cursor=7&limit=100&format=json".to_owned(),
                None
            )
        );
        assert!(parse(&["usage", "--format", "xml"]).is_err());
        assert!(parse(&["usage", "--tenant", "t", "export"]).is_err());
    }

    #[test]
    fn watch_needs_a_positive_interval() {
        for bad in ["0", "-1", "soon"] {
            assert!(parse(&["util", "--watch", bad]).is_err(), "{bad}");
        }
    }
}
