def main():
    print("twotower")
