"""A third-party backend package that fails at import (a missing native library)."""
raise ImportError("libbadaccel.so: cannot open shared object file")
