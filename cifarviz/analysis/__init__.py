"""The analysis layer: metrics, explore (selections, neighbours, Grad-CAM), summary (layer tables), embed (2-D maps)
and influence. Built on the core and the store; never imports services, the UI or Streamlit."""
