//! Models for llnode: reading Hugging Face Optimum "decoder with past"
//! exports, cutting them into units at layer boundaries, packaging the units,
//! running any range of consecutive units with tract, and turning logits into
//! text. Pure parts (segmentation, transmission maps, sampling) know nothing of
//! networking; the node crate wires this to the mesh.

pub mod atomic;
pub mod cost;
pub mod generate;
pub mod model;
pub mod onnx;
pub mod package;
pub mod pipeline;
pub mod progress;
pub mod raw;
pub mod runner;
pub mod sampling;
pub mod segment;
pub mod shape;
pub mod synth;
pub mod tokenizer;
pub mod transmission;
pub mod weight;
