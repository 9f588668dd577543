"""Ray Tune sweeps: the sweep file (`config`), the run (`runner`), one trial (`trial`), the parent run and its children in MLflow (`record`)."""
