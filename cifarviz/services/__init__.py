"""The services layer: jobs (keyed background work), runs (training runs in worker processes) and tune (Optuna).
Built on core, store and analysis; never imports the UI or Streamlit."""
