"""Streamlit helpers of single pages that do not belong in the shared cifarviz.ui.app (which they build on)."""
