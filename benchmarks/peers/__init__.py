"""Peer systems (other libraries' Wide & Deep) run in their own venvs, fed our exact features."""
