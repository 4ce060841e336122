"""The Streamlit audit dashboard (``streamlit run dashboards/app.py``); reads, never writes the store."""
