//! `peftbench`: train every PEFT method on the same tasks under matched parameter budgets and
//! report how they compare.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use peftbench_backbone::{load_model, parse_device, parse_dtype, TextTokenizer, Transformer};
use peftbench_harness::claim::ClaimPolicy;
use peftbench_harness::task::TaskSource;
use peftbench_harness::{grid, load_task, run_grid_with, synthetic, Base, Shard, Suite, TaskData};
use peftbench_methods::MethodConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// Counts live heap bytes, so each run's peak memory is its own (backbone/src/heap.rs).
#[global_allocator]
static ALLOC: peftbench_backbone::heap::CountingAlloc = peftbench_backbone::heap::CountingAlloc;

mod adapters;
mod eval;
mod plan;

#[derive(Parser)]
#[command(
    name = "peftbench",
    version,
    about = "A benchmark and reproducibility harness for parameter-efficient fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a suite's grid (tasks × methods × budgets × seeds); already-recorded runs are
    /// skipped. With no suite, runs the embedded default, which needs no files.
    Run {
        /// A committed suite by name (see suites/).
        #[arg(long, conflicts_with = "config")]
        suite: Option<String>,
        /// A suite file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run only slice i of n of the grid: `i/n` with i from 1 (e.g. 2/4), or `auto` to
        /// read a Slurm array task's or a Kubernetes Indexed Job's index from the environment.
        #[arg(long)]
        shard: Option<String>,
        /// Where records go (one folder per suite).
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Skip writing the report when the grid is done.
        #[arg(long)]
        no_report: bool,
        /// Seconds without a heartbeat after which another process's claim on a run is stale
        /// and taken over (default 600, or $PEFTBENCH_CLAIM_TIMEOUT).
        #[arg(long)]
        claim_timeout: Option<f64>,
        /// Where to train: cpu, cuda or cuda:N (default: the suite's `device`, else cpu).
        #[arg(long)]
        device: Option<String>,
        /// Precision, overriding the suite's `[train] dtype`: f32, bf16 (the frozen base in
        /// bf16, trained parameters in f32), or quantized (a GGUF base's projections kept in
        /// their blocks). Part of each run's configuration hash.
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Print a suite's grid: every run, whether it is recorded, pending, stale or claimed, and
    /// the training time to expect from recorded runs of the same method.
    Plan {
        /// A committed suite by name (see suites/).
        #[arg(long, conflicts_with = "config")]
        suite: Option<String>,
        /// A suite file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Results folder given to `run`.
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Also split the pending work into this many shards (as `--shard i/n` would).
        #[arg(long)]
        shards: Option<usize>,
    },
    /// Reload a recorded run's saved adapter and head, score the dev set again and check the
    /// recorded metrics come back.
    Eval {
        /// The run's record (`results/<suite>/runs/<run id>.json`).
        #[arg(long)]
        run: PathBuf,
        /// Data root for the task's files (default: the suite's, or $PEFTBENCH_DATA).
        #[arg(long)]
        data_root: Option<PathBuf>,
    },
    /// Write CSV tables, PNG plots and REPORT.md from a suite's records.
    Report {
        /// Suite name.
        #[arg(long)]
        suite: String,
        /// Results folder given to `run`.
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Output folder (default: <results>/<suite>/report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Train a small GPT-2- or Llama-style decoder (and its BPE tokenizer) on a text corpus and
    /// write a Hugging Face-style directory that loads like any checkpoint.
    Pretrain {
        /// Plain-text corpus (e.g. ../shared/datasets/tinyshakespeare/input.txt).
        #[arg(long)]
        corpus: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// gpt2 or llama.
        #[arg(long, default_value = "gpt2")]
        family: String,
        /// BPE vocabulary size.
        #[arg(long, default_value_t = 2048)]
        vocab_size: usize,
        /// Hidden width.
        #[arg(long, default_value_t = 128)]
        hidden_size: usize,
        /// Layers.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Sequence length.
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        /// Optimizer steps.
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Sequences per step.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Peak learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to train: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Greedy generation (with a key/value cache) from a causal base and, optionally, an
    /// adapter (PEFT's format): JSON on stdout.
    Generate {
        /// The base model: a directory, a `.gguf` file, or `smollm2`.
        #[arg(long)]
        model: PathBuf,
        /// The adapter directory.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A prompt (repeat for several).
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        /// Most new tokens per prompt (decoding stops at EOS too).
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
    },
    /// Fold a LoRA or AdaLoRA adapter (PEFT's format) into its base and write a plain Hugging
    /// Face model directory.
    Merge {
        /// The base model directory.
        #[arg(long)]
        model: PathBuf,
        /// The adapter directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Where the merged model goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the token ids and logits of texts under a base model and, optionally, an adapter
    /// (PEFT's format): the head's logits for a sequence-classification adapter, else the
    /// next-token logits at the last position. JSON on stdout.
    Score {
        /// The base model: a directory or a `.gguf` file.
        #[arg(long)]
        model: PathBuf,
        /// The adapter directory.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A text to score (repeat for a batch).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
    },
    /// List the methods with their size knobs and trainable-parameter formulas.
    Methods {
        /// Also print each count on this model (a Hugging Face directory or a `.gguf` file).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

/// The committed suites, embedded so the binary works from any folder.
const SUITES: [(&str, &str); 13] = [
    ("default", include_str!("../suites/default.toml")),
    (
        "objectives-minilm-quick",
        include_str!("../suites/objectives-minilm-quick.toml"),
    ),
    (
        "alpaca-sft-quick",
        include_str!("../suites/alpaca-sft-quick.toml"),
    ),
    (
        "glue-minilm-quick",
        include_str!("../suites/glue-minilm-quick.toml"),
    ),
    ("glue-minilm", include_str!("../suites/glue-minilm.toml")),
    ("rte-minilm", include_str!("../suites/rte-minilm.toml")),
    ("cola-minilm", include_str!("../suites/cola-minilm.toml")),
    (
        "sst2-lora-analysis",
        include_str!("../suites/sst2-lora-analysis.toml"),
    ),
    (
        "sst2-precision",
        include_str!("../suites/sst2-precision.toml"),
    ),
    ("hh-minilm", include_str!("../suites/hh-minilm.toml")),
    (
        "alpaca-smollm",
        include_str!("../suites/alpaca-smollm.toml"),
    ),
    ("hh-smollm", include_str!("../suites/hh-smollm.toml")),
    ("mrpc-minilm", include_str!("../suites/mrpc-minilm.toml")),
];

/// A fetched model: `$var` if set, else `path` under the home directory.
fn fetched(var: &str, path: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(path))
}

fn model_dir(name: &str) -> PathBuf {
    match (name, name.strip_prefix("~/")) {
        // scripts/fetch-minilm.sh and scripts/fetch-smollm2.sh put them there.
        ("minilm", _) => fetched("PEFTBENCH_MINILM", ".cache/peftbench/all-MiniLM-L6-v2"),
        ("smollm2", _) => fetched(
            "PEFTBENCH_SMOLLM2",
            ".cache/peftbench/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        (_, Some(rest)) => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(rest),
        _ => PathBuf::from(name),
    }
}

/// A model argument: a directory, a `.gguf` file, or `minilm` / `smollm2` for the fetched
/// all-MiniLM-L6-v2 / SmolLM2-135M-Instruct.
fn model_dir_arg(p: &Path) -> PathBuf {
    model_dir(&p.to_string_lossy())
}

fn load_base(dir: &Path, max_len: usize) -> Result<Base> {
    let model = load_model(dir, &candle_core::Device::Cpu).with_context(|| {
        format!(
            "loading the base model from {} (for `minilm`, run scripts/fetch-minilm.sh; for `smollm2`, scripts/fetch-smollm2.sh)",
            dir.display()
        )
    })?;
    let tokenizer = TextTokenizer::for_model(dir, max_len)?;
    Ok(Base { model, tokenizer })
}

fn claim_policy(timeout: Option<f64>) -> Result<ClaimPolicy> {
    let secs = match timeout {
        Some(t) => Some(t),
        None => match std::env::var("PEFTBENCH_CLAIM_TIMEOUT") {
            Ok(v) => Some(v.trim().parse::<f64>().with_context(|| {
                format!("PEFTBENCH_CLAIM_TIMEOUT=`{v}` is not a number of seconds")
            })?),
            Err(_) => None,
        },
    };
    match secs {
        None => Ok(ClaimPolicy::default()),
        Some(s) if s.is_finite() && s > 0.0 => Ok(ClaimPolicy {
            stale_after: std::time::Duration::from_secs_f64(s),
        }),
        Some(s) => bail!("the claim timeout must be a positive number of seconds, got {s}"),
    }
}

fn run_suite(
    suite: Suite,
    shard: Option<String>,
    results: &Path,
    report: bool,
    policy: ClaimPolicy,
    device: &candle_core::Device,
) -> Result<()> {
    let shard = match shard {
        Some(s) => Shard::from_arg(&s).map_err(anyhow::Error::msg)?,
        None => Shard::ALL,
    };
    let (mut base, tasks) = load_base_and_tasks(
        &suite.name,
        &suite.model,
        suite.data_root.clone(),
        &suite.tasks,
    )?;
    suite.check_against(&base.model.config, &tasks)?;
    if suite.train.dtype == peftbench_harness::Precision::Quantized {
        let path = model_dir(&suite.model);
        if !peftbench_backbone::is_gguf(&path) || !device.is_cpu() {
            bail!(
                "dtype = \"quantized\" keeps a GGUF base's projections in their blocks on the CPU; `{}` on {} is not that",
                suite.model,
                peftbench_backbone::device_name(device)
            );
        }
        let n = peftbench_backbone::GgufFile::open(&path)?.quantize_projections(&mut base.model)?;
        eprintln!(
            "quantized base: {n} projections kept in their GGUF blocks, {:.0} MB of weights",
            base.model.weight_bytes() as f64 / 1e6
        );
    }
    // The base moves to the device once, in the suite's precision; every run clones it there.
    base.model = base.model.to(device, suite.train.dtype.dtype_on(device))?;
    let summary = run_grid_with(&suite, &base, &tasks, results, shard, policy)?;
    eprintln!(
        "ran {}, skipped {} already recorded, {} claimed by other processes; {} of {} runs of the grid recorded",
        summary.ran, summary.skipped, summary.held_elsewhere, summary.recorded, summary.grid_runs
    );
    if !report {
        return Ok(());
    }
    if summary.complete() {
        write_report(&suite.name, results, None)?;
    } else {
        // A report from a partial grid would look final; the last process to finish writes it.
        eprintln!(
            "partial: {} of {} runs recorded; the report is left to the process that records the last one (or `peftbench report --suite {}`)",
            summary.recorded, summary.grid_runs, suite.name
        );
    }
    Ok(())
}

/// The base model and every task's data, loaded as `run` loads them for a suite.
fn load_base_and_tasks(
    suite_name: &str,
    model: &str,
    data_root: Option<PathBuf>,
    tasks_config: &[peftbench_harness::TaskConfig],
) -> Result<(Base, HashMap<String, TaskData>)> {
    let mut tasks: HashMap<String, TaskData> = HashMap::new();
    let base = if model == "synthetic" {
        let (base, trained) = synthetic::pretrained_base(&synthetic::cache_dir())?;
        if let Some((first, last)) = trained {
            eprintln!(
                "pretrained the synthetic base: loss {first:.3} -> {last:.3} (cached in {})",
                synthetic::cache_dir().display()
            );
        }
        for t in tasks_config {
            let TaskSource::Synthetic { objective } = &t.source else {
                bail!(
                    "suite {}: task `{}` is not synthetic but the model is",
                    suite_name,
                    t.name
                );
            };
            let mut data = synthetic::task(
                objective,
                &base.tokenizer,
                t.train_limit.unwrap_or(256),
                t.dev_limit.unwrap_or(200),
                11,
            )?;
            data.name = t.name.clone();
            data.pooling = t.pooling;
            tasks.insert(t.name.clone(), data);
        }
        base
    } else {
        let data_root = data_root
            .or_else(peftbench_datasets::shared_datasets_root)
            .context("no data root: set data_root in the suite or PEFTBENCH_DATA")?;
        let max_len = tasks_config.iter().map(|t| t.max_len).max().unwrap_or(128);
        let base = load_base(&model_dir(model), max_len)?;
        for t in tasks_config {
            let mut tok = TextTokenizer::for_model(&model_dir(model), t.max_len)?;
            tok.pad_id = base.tokenizer.pad_id;
            let data = load_task(t, &tok, &data_root)
                .with_context(|| format!("loading task `{}`", t.name))?;
            eprintln!(
                "task {}: {} train / {} dev examples ({} bad rows skipped)",
                t.name,
                data.train.len(),
                data.dev.len(),
                data.skipped_rows
            );
            tasks.insert(t.name.clone(), data);
        }
        base
    };
    Ok((base, tasks))
}

fn write_report(suite: &str, results: &Path, out: Option<PathBuf>) -> Result<()> {
    let runs = grid::runs_dir(results, suite);
    let out = out.unwrap_or_else(|| results.join(suite).join("report"));
    // Subspace similarity reads the adapters the runs saved, under the same runs folder.
    let subspace = |records: &[peftbench_reports::RunRecord]| {
        peftbench_harness::subspace::subspace_comparisons(&runs, records)
    };
    let s = peftbench_reports::write_report_with(&runs, &out, &subspace)?;
    for bad in &s.skipped {
        eprintln!("skipped an unreadable record: {bad}");
    }
    eprintln!(
        "report: {} ({} runs, {} ok{})",
        s.report.display(),
        s.records,
        s.ok_runs,
        match s.skipped.len() {
            0 => String::new(),
            n => format!(", {n} unreadable records skipped"),
        }
    );
    Ok(())
}

fn methods(model: Option<PathBuf>) -> Result<()> {
    let model: Option<Transformer> = match model {
        Some(dir) => Some(load_model(&model_dir_arg(&dir), &candle_core::Device::Cpu)?),
        None => None,
    };
    println!(
        "{:<14} {:<24} {:>10}  trainable parameters",
        "method", "size knob", "count"
    );
    // Registration order: the controls (full fine-tuning, head-only) close the list.
    for m in MethodConfig::all() {
        let knob = m
            .knob()
            .map_or("-".to_string(), |k| format!("{}={}", k.name, k.value));
        let count = match &model {
            Some(t) => m
                .num_trainable(t)
                .map_or_else(|e| e.to_string(), |n| n.to_string()),
            None => "-".into(),
        };
        println!(
            "{:<14} {:<24} {:>10}  {}",
            m.name(),
            knob,
            count,
            m.formula()
        );
    }
    Ok(())
}

/// The suite a command names: a file, a committed suite, or the embedded default.
fn resolve_suite(suite: Option<String>, config: Option<PathBuf>) -> Result<Suite> {
    Ok(match (suite, config) {
        (_, Some(path)) => Suite::from_file(&path)?,
        (Some(name), None) => {
            let (_, text) = SUITES.iter().find(|(n, _)| *n == name).with_context(|| {
                format!(
                    "no suite `{name}` (committed: {})",
                    SUITES.map(|s| s.0).join(", ")
                )
            })?;
            Suite::parse(text, &format!("suites/{name}.toml"))?
        }
        (None, None) => Suite::parse(SUITES[0].1, "suites/default.toml")?,
    })
}

fn main() -> Result<()> {
    peftbench_backbone::keep_freed_memory();
    if std::env::var_os("PEFTBENCH_COUNT_HEAP").is_some_and(|v| v == "0") {
        peftbench_backbone::heap::disable();
    }
    let cli = Cli::parse();
    peftbench_backbone::kernels::check_kernels_env().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Run {
            suite,
            config,
            shard,
            results,
            no_report,
            claim_timeout,
            device,
            dtype,
        } => {
            let mut suite = resolve_suite(suite, config)?;
            if let Some(d) = dtype {
                suite.train.dtype = match d.as_str() {
                    "quantized" => peftbench_harness::Precision::Quantized,
                    _ => match parse_dtype(&d).map_err(anyhow::Error::msg)? {
                        candle_core::DType::BF16 => peftbench_harness::Precision::Bf16,
                        _ => peftbench_harness::Precision::F32,
                    },
                };
            }
            let device = device.or_else(|| suite.device.clone());
            let device =
                parse_device(device.as_deref().unwrap_or("cpu")).map_err(anyhow::Error::msg)?;
            run_suite(
                suite,
                shard,
                &results,
                !no_report,
                claim_policy(claim_timeout)?,
                &device,
            )
        }
        Command::Plan {
            suite,
            config,
            results,
            shards,
        } => plan::print_plan(&resolve_suite(suite, config)?, &results, shards),
        Command::Report {
            suite,
            results,
            out,
        } => write_report(&suite, &results, out),
        Command::Eval { run, data_root } => eval::eval(&run, data_root, &load_base_and_tasks),
        Command::Methods { model } => methods(model),
        Command::Merge {
            model,
            adapter,
            out,
        } => adapters::merge(&model_dir_arg(&model), &adapter, &out),
        Command::Generate {
            model,
            adapter,
            prompts,
            max_new_tokens,
        } => adapters::generate(
            &model_dir_arg(&model),
            adapter.as_deref(),
            &prompts,
            max_new_tokens,
        ),
        Command::Score {
            model,
            adapter,
            texts,
        } => adapters::score(&model_dir_arg(&model), adapter.as_deref(), &texts),
        Command::Pretrain {
            corpus,
            out,
            family,
            vocab_size,
            hidden_size,
            layers,
            heads,
            max_len,
            steps,
            batch_size,
            lr,
            seed,
            device,
        } => {
            use peftbench_harness::pretrain::{pretrain_corpus, CorpusPretrain, PretrainConfig};
            let text = peftbench_datasets::load_text(&corpus)?;
            let cfg = CorpusPretrain {
                family,
                vocab_size,
                hidden_size,
                num_layers: layers,
                num_heads: heads,
                max_len,
                train: PretrainConfig {
                    steps,
                    batch_size,
                    optim: peftbench_harness::optim::OptimConfig {
                        lr,
                        weight_decay: 0.01,
                        decay: peftbench_harness::optim::Decay::Cosine,
                        ..Default::default()
                    },
                    seed,
                },
            };
            let device = parse_device(&device).map_err(anyhow::Error::msg)?;
            let r = pretrain_corpus(&text, &cfg, &out, &device)?;
            println!(
                "pretrained on {} sequences: loss {:.3} -> {:.3}; held-out perplexity {:.1} (untrained {:.1}); wrote {}",
                r.sequences, r.first_loss, r.last_loss, r.val_perplexity, r.val_perplexity_untrained, out.display()
            );
            Ok(())
        }
    }
}
