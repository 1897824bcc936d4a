"""The core layer: data (find, decode, split), models (the zoo and its cards), train (the engine), recipes,
checkpoint (safe files), inference, settings, errors. It imports nothing above it and never imports Streamlit."""
