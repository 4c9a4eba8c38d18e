"""The library's named choices and configs, apart from the code that uses them (plain data and checks only)."""
