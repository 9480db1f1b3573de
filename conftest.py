# Lets tests import the flat top-level modules (model.py, loss.py, ...) from any working directory.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
