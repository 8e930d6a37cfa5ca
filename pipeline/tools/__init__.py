"""Tools around the pipeline, never imported by a stage: benchmarks and ablations, the GPU check, the wheelhouse, the
demo bundle's builder, and the GPU-card listing."""
