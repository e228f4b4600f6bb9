"""RD Studio: the Streamlit front end. Presentation only; every computation is in ``rd``."""
