from lora_cpt.cli import main

if __name__ == "__main__":
    main()
