"""Streamlit helpers of single pages that do not belong in the shared cifarviz.app (which they build on)."""
