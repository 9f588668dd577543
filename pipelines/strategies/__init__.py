"""The strategies, one module or package each; `pipelines.registry` names them.

`local` and `allreduce` are a module each; `ps` (Downpour), `lbfgs` (Sandblaster), `diloco` and
`pipeline` (its code is `pipeline_parallel/`) are packages of a strategy, its driver and
its actors. A strategy package imports no other strategy package: what they share lives in
`pipelines.training`.
"""
