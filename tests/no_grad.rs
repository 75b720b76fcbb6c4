//! Evaluation forwards under `no_grad`: the same outputs, without the activations a backward
//! would need (they are freed layer by layer).

mod common;

use candle_core::Device;
use common::tiny_config;
use peftbench_backbone::heap::{live_bytes, CountingAlloc};
use peftbench_backbone::{no_grad, pad_rows, Initializer, Transformer};
use peftbench_methods::*;

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

/// One test in this binary: the heap counter is process-wide.
#[test]
fn no_grad_gives_the_same_outputs_and_keeps_only_a_layer_of_activations() {
    let mut init = Initializer::new(2);
    let rows: Vec<Vec<u32>> = (0..4)
        .map(|_| (0..48).map(|_| 1 + init.index(45) as u32).collect())
        .collect();
    let x = pad_rows(&rows, None, 0, &Device::Cpu).unwrap();
    for family in ["bert", "gpt2", "llama"] {
        let mut cfg = tiny_config(family);
        cfg.num_layers = 8;
        let mut model = Transformer::random(cfg, 3, &Device::Cpu).unwrap();
        let lora = MethodConfig::defaults()
            .into_iter()
            .find(|m| m.name() == "lora")
            .unwrap();
        let method = lora.attach(&mut AttachContext::new(&mut model, 7)).unwrap();
        // Live heap the output holds on to (its graph included), and the output.
        let held = |off: bool| {
            let before = live_bytes();
            let enc = if off {
                no_grad(|| model.forward(&x, method.as_ref()))
            } else {
                model.forward(&x, method.as_ref())
            }
            .unwrap();
            (live_bytes() - before, enc.hidden)
        };
        let (with_graph, h) = held(false);
        let (without, h_eval) = held(true);
        assert_eq!(
            common::max_abs_diff(&h, &h_eval),
            0.0,
            "{family}: outputs differ"
        );
        assert!(
            without * 4 < with_graph,
            "{family}: an evaluation forward holds {without} bytes, a training one {with_graph}"
        );
        assert!(
            peftbench_backbone::grad_enabled(),
            "no_grad left gradients off"
        );
    }
}
